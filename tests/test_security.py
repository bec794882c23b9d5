"""Nothing we read runs code: a crafted checkpoint is refused before anything unpickles it, our own
checkpoints (PPO, DeepSpeed, HF Trainer) hold only JSON, safetensors and plain tensor pickles, and
pickle weights (.bin) load only when the user opts in."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import RunsACommand, sft_config
from rewards import DigitReward
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

from rlhf import ppo
from rlhf.errors import UserError
from rlhf.ppo import checkpoint, models
from rlhf.runtime import checkpoints
from rlhf.stages import sft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ppo_run(sft_policy, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ppo_run")
    ppo.main(ppo_config(out, sft_policy, "--save_steps", "1"), reward=DigitReward())
    return out / "ppo"


def test_ppo_checkpoint_is_json_safetensors_and_tensor_pickles(ppo_run):
    ckpt = checkpoints.complete_checkpoints(ppo_run, checkpoint.STATE_FILE)[-1]
    names = {p.name for p in ckpt.iterdir()}
    assert not any(n.endswith(".pkl") for n in names), names  # no pickled scheduler, no pickled RNG
    assert {"ppo_state.json", "rng_state_0.json", "rng_state_0.safetensors", "model.safetensors"} <= names
    checkpoints.refuse_unsafe_pickles(ckpt)  # the optimizer's torch.save holds tensors and plain data only


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_crafted_checkpoint_is_refused_before_it_runs(tmp_path, sft_policy, ppo_run, name):  # noqa: F811
    out = tmp_path / "ppo"
    shutil.copytree(ppo_run, out)
    ckpt = checkpoints.complete_checkpoints(out, checkpoint.STATE_FILE)[-1]
    marker = tmp_path / "pwned"
    with open(ckpt / name, "wb") as f:
        pickle.dump({"state": RunsACommand(marker)}, f)
    with pytest.raises(UserError, match=f"checkpoint file '.*{name}'.*could run code"):
        ppo.main(ppo_config(tmp_path, sft_policy, "--resume", "latest", "--ppo.steps", "3"), reward=DigitReward())
    assert not marker.exists()
    # the same payload through the plain unpickler does run: the test's payload is real
    with open(ckpt / name, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_trainer_checkpoints_pass_and_crafted_ones_are_refused(tmp_path):
    sft.main(sft_config(tmp_path / "a", "--train.max_steps", "2", "--train.save_steps", "1", "--train.eval_steps", "1"))
    out = tmp_path / "a" / "out"
    ckpt = checkpoints.complete_checkpoints(out)[-1]
    assert {"optimizer.pt", "rng_state.pth"} <= {p.name for p in ckpt.iterdir()}
    assert checkpoints.resolve_resume("latest", out) == str(ckpt)  # numpy RNG state is plain data
    marker = tmp_path / "pwned"
    torch.save({"x": RunsACommand(marker)}, ckpt / "rng_state.pth")
    with pytest.raises(UserError, match="rng_state.pth.*could run code"):
        sft.main(sft_config(tmp_path / "a", "--train.max_steps", "3", "--train.save_steps", "1", "--train.eval_steps", "1",
                            "--resume", "latest"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def pickle_only_models(tmp_path_factory):
    """The tiny Llama (causal LM), a reward model on it and a LoRA adapter, each saved as .bin pickles only."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from policies import tiny
    from policies.config import TinyModelConfig

    def as_pickle(directory, name):  # transformers 5 writes safetensors only: convert, as an old checkpoint
        for f in directory.glob("*.safetensors"):
            torch.save(load_file(f), directory / name)
            f.unlink()

    root = tmp_path_factory.mktemp("pickles")
    tok = tiny.load_tokenizer()
    lm = tiny.build_model(TinyModelConfig(), tok)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    as_pickle(root / "lm", "pytorch_model.bin")
    lm.save_pretrained(root / "lm_safe")
    tok.save_pretrained(root / "lm_safe")
    adapter = peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(root / "adapter")
    as_pickle(root / "adapter", "adapter_model.bin")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(root / "lm_safe")}))
    # a safetensors adapter (an SFT output) whose base holds only pytorch_model.bin
    adapter.save_pretrained(root / "adapter_on_pickle_base")
    tok.save_pretrained(root / "adapter_on_pickle_base")
    (root / "adapter_on_pickle_base" / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": str(root / "lm")}))
    rm = AutoModelForSequenceClassification.from_pretrained(root / "lm_safe", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    as_pickle(root / "rm", "pytorch_model.bin")
    return root


def test_pickle_weights_are_refused_unless_allowed(pickle_only_models, tmp_path):
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_causal_lm
    from reward.interface import load_reward
    from rlhf.stages.merge import merge

    root = pickle_only_models
    lm = str(root / "lm")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin.*model.allow_pickle_weights: true"):
        load_causal_lm(lm, ModelConfig(name_or_path=lm))
    assert load_causal_lm(lm, ModelConfig(name_or_path=lm, allow_pickle_weights=True)).config.hidden_size > 0
    with pytest.raises(ModelLoadError, match="allow_pickle_weights"):
        load_reward(str(root / "rm"), kind="preference", device="cpu")
    assert load_reward(str(root / "rm"), kind="preference", device="cpu", allow_pickle_weights=True).score(
        [[{"role": "user", "content": "hi"}]], ["there"]).shape == (1,)
    with pytest.raises(ModelLoadError, match=r"adapter_model.bin.*--allow_pickle_weights"):
        merge(str(root / "adapter"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    merge(str(root / "adapter"), str(tmp_path / "merged"), allow_pickle_weights=True)
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_cli_refuses_pickle_weights_in_one_line(pickle_only_models, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run([sys.executable, "-m", "rlhf", "merge", str(pickle_only_models / "adapter"), str(tmp_path / "m")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "rlhf merge: error:" in p.stderr and "--allow_pickle_weights" in p.stderr


def test_adapter_loads_check_the_adapter_and_its_base(pickle_only_models, tmp_path):
    """The reviewer's cases: a reward/classifier run or PPO starting from an SFT adapter whose base holds only
    pytorch_model.bin, and `rlhf eval policy` / `rlhf generate` on an adapter_model.bin (peft loads it by
    itself when there is no safetensors)."""
    from policies.config import ModelConfig
    from policies.models import ModelLoadError
    from reward.models import merged_base
    from rlhf.evaluation.eval_policy import load_lm

    root = pickle_only_models
    on_pickle_base = str(root / "adapter_on_pickle_base")
    with pytest.raises(ModelLoadError, match=r"lm' holds its weights only as pickles.*model.allow_pickle_weights"):
        merged_base(on_pickle_base, tmp_path / "rm_base", ModelConfig(name_or_path=on_pickle_base))
    assert not (tmp_path / "rm_base").exists()
    merged = merged_base(on_pickle_base, tmp_path / "rm_base",
                         ModelConfig(name_or_path=on_pickle_base, allow_pickle_weights=True))
    assert (tmp_path / "rm_base" / "model.safetensors").exists() and merged == str(tmp_path / "rm_base")
    with pytest.raises(ModelLoadError, match=r"lm' holds.*model.allow_pickle_weights"):
        models._merged_policy_base(on_pickle_base, tmp_path / "policy_base", True, False)
    assert not (tmp_path / "policy_base").exists()
    for adapter in (root / "adapter", on_pickle_base):
        with pytest.raises(ModelLoadError, match="pickles.*--allow_pickle_weights"):
            load_lm(str(adapter))
        assert load_lm(str(adapter), allow_pickle_weights=True).config.hidden_size > 0
