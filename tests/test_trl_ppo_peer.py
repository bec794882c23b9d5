"""The TRL 1.12 PPOTrainer speed peer (rlhf/bench/peers/trl_ppo_peer.py).

The end-to-end test needs the peer's own venv (trl==1.12.0), which CI does not build: it runs when
RLHF_TRL_PPO_PYTHON names that venv's python, or when .venv-trl-ppo/ exists in the repository root
(create it with `rlhf/bench/peers/setup_trl_ppo.sh`). The other tests run under the project's own python.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "rlhf" / "bench" / "peers" / "trl_ppo_peer.py"
SETUP = REPO / "rlhf" / "bench" / "peers" / "setup_trl_ppo.sh"


@pytest.fixture(scope="module")
def peer_python() -> Path:
    """The peer venv's python, or skip."""
    env = os.environ.get("RLHF_TRL_PPO_PYTHON")
    path = Path(env) if env else REPO / ".venv-trl-ppo" / "bin" / "python"
    if not path.exists():
        where = f"RLHF_TRL_PPO_PYTHON={env} does not exist" if env else f"{path} does not exist"
        pytest.skip(f"no TRL 1.12 PPO peer venv ({where}): run rlhf/bench/peers/setup_trl_ppo.sh in the repository "
                    "root (creates .venv-trl-ppo) or set RLHF_TRL_PPO_PYTHON to that venv's python")
    return path


def run_peer(python, spec: dict, tmp_path: Path, timeout: int = 600):
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([str(python), str(PEER), "--spec", str(spec_path), "--out", str(out_path)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    result = json.loads(out_path.read_text()) if out_path.exists() else None
    return proc, result


def base_spec(policy: str, reward_model: str, prompts: list) -> dict:
    return {"policy": policy, "reward_model": reward_model, "prompts": prompts, "batch_size": 4,
            "response_length": 8, "steps": 2, "warmup_steps": 1, "ppo_epochs": 1, "num_mini_batches": 2,
            "learning_rate": 1e-5, "temperature": 1.0, "seed": 0, "lora": None, "dtype": "float32"}


@pytest.fixture(scope="module")
def tiny_models(peer_python, tmp_path_factory):
    """A random-init tiny Llama policy and a reward model (same backbone, num_labels=1) on disk."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from policies.config import ModelConfig
    from policies.models import materialize

    root = tmp_path_factory.mktemp("peer_models")
    policy = materialize(ModelConfig(name_or_path="tiny"), str(root / "policy"))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    return str(policy), str(root / "rm"), ordinary


def test_setup_script_is_executable_and_parses():
    assert os.access(SETUP, os.X_OK), f"{SETUP} must be executable"
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    text = SETUP.read_text()
    for pin in ("torch==2.13.0", "trl==1.12.0"):
        assert pin in text


def test_peer_needs_trl_1_12(tmp_path, monkeypatch):
    """Under the project's python (trl 1.16: no PPOTrainer) the peer writes a one-line error and exits 1."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this python has trl.experimental.ppo, so the missing-TRL path cannot be exercised here")
    (tmp_path / "policy").mkdir()
    (tmp_path / "rm").mkdir()
    spec = base_spec(str(tmp_path / "policy"), str(tmp_path / "rm"), [[5, 6, 7]] * 4)
    proc, result = run_peer(sys.executable, spec, tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert set(result) <= {"error", "trainer"}
    message = result["error"]
    assert "\n" not in message
    assert "trl==1.12.0" in message and "trl.experimental.ppo" in message


def test_peer_rejects_incomplete_spec(tmp_path):
    spec = base_spec(str(tmp_path), str(tmp_path), [[5, 6, 7]] * 4)
    del spec["reward_model"], spec["response_length"]
    proc, result = run_peer(sys.executable, spec, tmp_path, timeout=120)
    assert proc.returncode == 1
    assert result["error"] == "spec is missing field(s): reward_model, response_length"


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_peer_end_to_end(peer_python, tiny_models, tmp_path, lora):
    policy, rm, ordinary = tiny_models
    rng = random.Random(0)
    prompt_len = 12
    prompts = [[rng.choice(ordinary) for _ in range(prompt_len)] for _ in range(6)]
    spec = {**base_spec(policy, rm, prompts), "lora": lora}

    proc, result = run_peer(peer_python, spec, tmp_path)
    assert proc.returncode == 0, (result, proc.stderr[-3000:])
    assert "error" not in result
    assert result["trainer"] == "trl 1.12 PPOTrainer"
    assert result["versions"]["trl"] == "1.12.0"
    assert result["steps_timed"] == spec["steps"]
    assert len(result["iterations"]) == spec["steps"] + spec["warmup_steps"]

    t = result["time"]
    parts = [t["generate"], t["score"], t["forward"], t["train"]]
    assert all(p >= 0 for p in parts) and t["total"] > 0
    assert t["generate"] > 0 and t["score"] > 0 and t["forward"] > 0
    assert sum(parts) == pytest.approx(t["total"], rel=0.05)
    assert 0 <= sum(result["train_includes"].values()) <= t["train"] * 1.0001

    batch, response_length = spec["batch_size"], spec["response_length"]
    assert result["tokens_per_iteration"] == batch * (prompt_len + response_length)
    assert result["response_tokens_per_iteration"] == batch * response_length
    assert result["tokens_per_second"] == pytest.approx(result["tokens_per_iteration"] / t["total"], rel=0.01)
    assert result["peak_memory_gb"] > 0
    assert result["device"]

    trainable = result["trainable_parameters"]
    if lora is None:
        assert result["reference"] == "separate copy"
    else:
        assert result["reference"] == "policy with adapters disabled"
        assert 0 < trainable["policy"] < trainable["value"]  # LoRA on the policy; the value model trains fully
