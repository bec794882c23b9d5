"""Loading a model runs nothing from it: a folder's own Python code runs only when the user set
`model.trust_remote_code` (a "y" on stdin is not consent), the pickle-weights guard looks at the files
the loader will read (a decoy .safetensors beside them changes nothing), a pickle torch's weights-only
loader refuses ends in one line, and a YAML config of nested aliases is refused before anything expands it."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, RunsACommand

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The folder's code: importing it (which transformers does to run a custom architecture) leaves MARKER.
CUSTOM_CODE = '''from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast


class CustomConfig(LlamaConfig):
    model_type = "custom_llama"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig


class CustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomConfig


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
'''


def _with_custom_code(directory: Path, marker: Path) -> None:
    """Make a saved tiny Llama folder one that transformers can only load by running its custom_code.py:
    a model type and tokenizer class it does not know, and an auto_map naming the file's classes."""
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(model_type="custom_llama", auto_map={
        "AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomForCausalLM",
        "AutoModelForSequenceClassification": "custom_code.CustomForSequenceClassification"})
    (directory / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((directory / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom_code.CustomTokenizer"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(tok))
    (directory / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """root/model (a causal LM), root/reward (a reward-model directory) and root/adapter (a LoRA adapter on
    root/model), each of whose loads would run root/model's code; root/ran appears when it runs."""
    import peft

    from policies import tiny
    from policies.config import TinyModelConfig

    root = tmp_path_factory.mktemp("custom_code")
    tok = tiny.load_tokenizer()
    lm = tiny.build_model(TinyModelConfig(), tok)
    for name in ("model", "reward"):
        lm.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        _with_custom_code(root / name, root / "ran")
    (root / "reward" / "reward_info.json").write_text(json.dumps({"version": 1, "kind": "preference"}))
    peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(
        root / "adapter")
    adapter_cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({**adapter_cfg, "base_model_name_or_path": str(root / "model")}))
    return root


def _run(args: list[str], root: Path, stdin: str = "y\n" * 50) -> subprocess.CompletedProcess:
    """A subprocess answering "y" to every question; transformers keeps its module cache under root."""
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


# Each loader that takes a model from the user, on the custom-code folders, in one process with "y" on stdin.
WALK = r'''
import json, sys
from pathlib import Path
import torch
root = Path(sys.argv[1])
model, reward, adapter = str(root / "model"), str(root / "reward"), str(root / "adapter")
from policies.config import ModelConfig
from policies import models
from reward import models as reward_models
from reward.interface import load_reward
from rlhf.evaluation.eval_policy import load_lm
from rlhf.ppo import models as ppo_models
from rlhf.runtime import memory
from rlhf.stages.merge import merge
loaders = {
    "load_tokenizer": lambda: models.load_tokenizer(model, ModelConfig(name_or_path=model)),
    "load_causal_lm": lambda: models.load_causal_lm(model, ModelConfig(name_or_path=model)),
    "load_sequence_classifier": lambda: reward_models.load_sequence_classifier(
        model, ModelConfig(name_or_path=model), 1, 0),
    "merged_base": lambda: reward_models.merged_base(adapter, root / "merged_base", ModelConfig(name_or_path=adapter)),
    "load_reward": lambda: load_reward(reward, device="cpu"),
    "load_lm": lambda: load_lm(model),
    "load_lm_adapter": lambda: load_lm(adapter),
    "merge": lambda: merge(adapter, str(root / "merged")),
    "memory_config": lambda: memory._load_config(model, model, "the directory"),
    "ppo_reward_body": lambda: ppo_models._load_reward_body(reward, torch.float32),
}
out = {}
for name, load in loaders.items():
    try:
        load()
        out[name] = ["loaded", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print("\n" + json.dumps(out))
'''


def test_no_loader_runs_a_folders_code_after_a_yes(custom):
    p = _run(["-c", WALK, str(custom)], custom)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert not (custom / "ran").exists(), results
    assert "Do you wish to run the custom code" not in p.stdout + p.stderr  # nobody was even asked
    for name, (error, message) in results.items():
        assert "custom code" in message, (name, error, message)  # each refused, saying why
        if name != "ppo_reward_body":  # reached only with a reward directory PPO has loaded already
            assert error in ("ModelLoadError", "UserError", "RewardError") and "\n" not in message, (name, error)


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_cli_with_yes_on_stdin_exits_2_in_one_line(custom, tmp_path, command):
    """`echo y | rlhf generate --model FOLDER` ran the folder's code before."""
    if command == "generate":
        args = ["generate", "--model", str(custom / "model"), "--output", str(tmp_path / "g.jsonl"),
                "--prompts.max_samples", "2", "--max_new_tokens", "2"]
    else:
        args = ["merge", str(custom / "adapter"), str(tmp_path / "merged")]
    p = _run(["-m", "rlhf", *args], custom)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"rlhf {command}: error:"), p.stderr
    assert "custom code" in p.stderr
    assert not (custom / "ran").exists() and not (tmp_path / "g.jsonl").exists() and not (tmp_path / "merged").exists()


def test_trust_remote_code_runs_it(custom, tmp_path):
    """The control: the folder's code is real, and `model.trust_remote_code: true` is what lets it run."""
    code = ("import sys\nfrom policies.config import ModelConfig\nfrom policies.models import load_causal_lm\n"
            "m = load_causal_lm(sys.argv[1], ModelConfig(name_or_path=sys.argv[1], trust_remote_code=True))\n"
            "print(type(m).__name__)")
    folder = tmp_path / "model"
    import shutil

    shutil.copytree(custom / "model", folder)
    (folder / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(tmp_path / "ran")))
    p = _run(["-c", code, str(folder)], tmp_path, stdin="")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "CustomForCausalLM" and (tmp_path / "ran").exists()


# peft reads only adapter_config.json and the adapter weights (load_peft_weights), never a module.
_NO_REMOTE_CODE = {"PeftModel", "peft.PeftModel", "peft.PeftConfig"}


def test_every_from_pretrained_names_trust_remote_code():
    """A new loader that leaves trust_remote_code unset lets transformers ask y/N, and a "y" runs code."""
    missing = []
    for folder in ("rlhf", "policies", "reward"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained" and ast.unparse(node.func.value) not in _NO_REMOTE_CODE
                        and "trust_remote_code" not in {k.arg for k in node.keywords}):
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# Pickle weights: the files the loader reads


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """lm_safe (safetensors), and beside it folders whose loaded weights are pickles: plain tensors
    (adapter_bin, lm_bin) and crafted ones that run `touch root/ran` (adapter_evil, lm_evil, rm_evil)."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from policies import tiny
    from policies.config import TinyModelConfig

    root = tmp_path_factory.mktemp("pickle_weights")
    tok = tiny.load_tokenizer()
    lm = tiny.build_model(TinyModelConfig(), tok)
    lm.save_pretrained(root / "lm_safe")
    tok.save_pretrained(root / "lm_safe")
    adapter = peft.get_peft_model(lm, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    rm = AutoModelForSequenceClassification.from_pretrained(root / "lm_safe", num_labels=1, trust_remote_code=False)
    rm.config.pad_token_id = tok.pad_token_id
    for name, model, weights in (("lm", lm, "pytorch_model.bin"), ("adapter", adapter, "adapter_model.bin"),
                                 ("rm", rm, "pytorch_model.bin")):
        for kind in ("bin", "evil"):
            folder = root / f"{name}_{kind}"
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            (safe,) = folder.glob("*.safetensors")
            state = load_file(safe)
            safe.unlink()
            torch.save(state if kind == "bin" else {**state, "x": RunsACommand(root / "ran")}, folder / weights)
            (folder / "decoy.safetensors").write_bytes(Path(root / "lm_safe" / "model.safetensors").read_bytes())
        if name == "adapter":
            for kind in ("bin", "evil"):
                cfg_file = root / f"adapter_{kind}" / "adapter_config.json"
                cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                                "base_model_name_or_path": str(root / "lm_safe")}))
    (root / "rm_evil" / "reward_info.json").write_text(json.dumps({"version": 1, "kind": "preference"}))
    return root


def test_a_decoy_safetensors_does_not_pass_the_guard(pickles, tmp_path):
    """Each folder holds decoy.safetensors beside the pickle the loader would read."""
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_causal_lm, refuse_pickle_weights
    from reward.interface import load_reward
    from rlhf.evaluation.eval_policy import load_lm
    from rlhf.stages.merge import merge

    lm, adapter = str(pickles / "lm_bin"), str(pickles / "adapter_bin")
    with pytest.raises(ModelLoadError, match=r"lm_bin' holds its weights only as pickles \(pytorch_model.bin\)"):
        load_causal_lm(lm, ModelConfig(name_or_path=lm))
    with pytest.raises(ModelLoadError, match=r"adapter_bin' holds .*\(adapter_model.bin\).*--allow_pickle_weights"):
        load_lm(adapter)
    with pytest.raises(ModelLoadError, match=r"adapter_bin' holds .*\(adapter_model.bin\).*--allow_pickle_weights"):
        merge(adapter, str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ModelLoadError, match=r"rm_bin' holds .*\(pytorch_model.bin\)"):
        load_reward(str(pickles / "rm_bin"), kind="preference", device="cpu")
    # the same folders load when allowed (plain tensors), and a safetensors model beside a stray pickle passes
    assert load_lm(adapter, allow_pickle_weights=True).config.hidden_size > 0
    refuse_pickle_weights(str(pickles / "lm_safe"), False)
    (pickles / "lm_safe" / "pytorch_model.bin").write_bytes((pickles / "lm_bin" / "pytorch_model.bin").read_bytes())
    try:
        refuse_pickle_weights(str(pickles / "lm_safe"), False)  # transformers reads model.safetensors first
    finally:
        (pickles / "lm_safe" / "pytorch_model.bin").unlink()


def test_the_guard_reads_the_index_and_ignores_non_weights(tmp_path):
    from policies.models import ModelLoadError, refuse_pickle_weights

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model-00001-of-00001.bin").write_bytes(b"")
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    refuse_pickle_weights(str(folder), False)  # every shard the index names is safetensors
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors",
                                                "v": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(ModelLoadError, match=r"holds its weights only as pickles \(pytorch_model-00001-of-00001.bin\)"):
        refuse_pickle_weights(str(folder), False)
    index.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"model.safetensors.index.json: malformed index"):
        refuse_pickle_weights(str(folder), False)
    # a training checkpoint: its optimizer and RNG pickles are not weights any loader reads (resume checks them)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "config.json"):
        (checkpoint / name).write_text("{}")
    for name in ("adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "training_args.bin"):
        (checkpoint / name).write_bytes(b"")
    refuse_pickle_weights(str(checkpoint), False)
    (checkpoint / "adapter_model.safetensors").rename(checkpoint / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match=r"checkpoint-2' holds its weights only as pickles \(adapter_model.bin\)"):
        refuse_pickle_weights(str(checkpoint), False)


def test_allowed_pickle_that_torch_refuses_is_one_line(pickles, tmp_path):
    """allow_pickle_weights lets torch's weights-only unpickler read .bin; a crafted one it refuses is
    the user's error, in one line, with nothing run."""
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_causal_lm
    from reward.errors import RewardError
    from reward.interface import load_reward
    from rlhf.errors import UserError
    from rlhf.evaluation.eval_policy import load_lm
    from rlhf.stages.merge import merge

    refused = "torch's weights-only loader refused a pickle weights file .*GLOBAL posix.system.*more than plain tensors"
    lm = str(pickles / "lm_evil")
    for load, error in ((lambda: load_causal_lm(lm, ModelConfig(name_or_path=lm, allow_pickle_weights=True)),
                         ModelLoadError),
                        (lambda: load_lm(str(pickles / "adapter_evil"), allow_pickle_weights=True), ModelLoadError),
                        (lambda: merge(str(pickles / "adapter_evil"), str(tmp_path / "m"), allow_pickle_weights=True),
                         UserError),
                        (lambda: load_reward(str(pickles / "rm_evil"), device="cpu", allow_pickle_weights=True),
                         RewardError)):
        with pytest.raises(error, match=refused) as info:
            load()
        assert "\n" not in str(info.value)
    assert not (pickles / "ran").exists() and not (tmp_path / "m").exists()
    p = _run(["-m", "rlhf", "merge", str(pickles / "adapter_evil"), str(tmp_path / "m"), "--allow_pickle_weights"],
             tmp_path, stdin="")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "weights-only loader refused" in p.stderr, p.stderr
    assert not (pickles / "ran").exists()


# ---------------------------------------------------------------------------------------------
# YAML aliases


def _alias_bomb(depth: int, width: int = 9) -> str:
    """Each level a mapping of `width` aliases to the level below: under 1 kB, width**depth values expanded."""
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: lol" for i in range(width)) + "}"]
    for d in range(1, depth + 1):
        lines.append(f"l{d}: &l{d} {{" + ", ".join(f"k{i}: *l{d - 1}" for i in range(width)) + "}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Depth 7 took 16 s and 1.7 GB in the line map before; depth 9 expands to 9**9 (~387 million) values."""
    from rlhf import config
    from rlhf.errors import UserError

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(9))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"^{path}: the YAML expands to more than 100,000 values through its aliases"):
        config.read_yaml(str(path))
    assert time.perf_counter() - start < 5  # bounded by the text, not by the expansion
    path.write_text("train: &x\n  a: *x\n")  # an alias inside the value it names: endless
    with pytest.raises(UserError, match="alias .* refers to the value that holds it"):
        config.read_yaml(str(path))


def test_yaml_with_a_few_aliases_still_loads(tmp_path):
    from rlhf import config

    path = tmp_path / "c.yaml"
    path.write_text("model: &m\n  name_or_path: tiny\nref: *m\ntrain:\n  learning_rate: 0.001\n")
    data, lines = config.read_yaml(str(path))
    assert data == {"model": {"name_or_path": "tiny"}, "ref": {"name_or_path": "tiny"},
                    "train": {"learning_rate": 0.001}}
    assert lines == {"model": 1, "model.name_or_path": 2, "ref": 3, "ref.name_or_path": 2, "train": 4,
                     "train.learning_rate": 5}


# ---------------------------------------------------------------------------------------------
# The default install, and what is missing from it


def test_default_install_has_deepspeed_and_bitsandbytes():
    """`pip install -e .` (no extras) installs what --accelerate zero2/zero3 and --peft.method qlora need."""
    import importlib.metadata
    import re
    import tomllib

    def unconditional(requirements) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements if "extra ==" not in r}

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"deepspeed", "bitsandbytes"} <= unconditional(declared)
    dist = importlib.metadata.distribution("rlhf")
    installed_from = json.loads(dist.read_text("direct_url.json") or "{}").get("url")
    if installed_from == REPO.as_uri():  # this checkout is the installed one: what pip was told to install
        assert {"deepspeed", "bitsandbytes"} <= unconditional(dist.requires or [])


def _without(module: str, args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a process where `import module` fails, as in an environment that lacks it."""
    code = (f"import sys\nsys.modules[{module!r}] = None\n{prelude}\nfrom rlhf.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "RLHF_VLLM_PYTHON"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})


@pytest.mark.parametrize("module, args, command", [
    ("bitsandbytes", ["--peft.method", "qlora"], "pip install bitsandbytes"),
    ("deepspeed", ["--accelerate", "zero2", "--num_processes", "1"], "pip install deepspeed"),
])
def test_a_missing_package_is_one_line_naming_its_install(tmp_path, module, args, command):
    p = _without(module, ["sft", "--config", str(REPO / "configs" / "sft_tiny.yaml"), "--output_dir",
                          str(tmp_path / "out"), "--train.max_steps", "1", *args], REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rlhf sft: error:") and command in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_missing_vllm_is_one_line_naming_its_install(pickles, tmp_path):
    """Without vLLM here, in RLHF_VLLM_PYTHON or a .venv-vllm (the checkout's is hidden), `--engine vllm` says
    which command creates one."""
    hide_checkout_env = ("import pathlib\nimport rlhf.generation.vllm_engine as engine\n"
                         f"engine.REPO_ROOT = pathlib.Path({str(tmp_path)!r})")
    p = _without("vllm", ["generate", "--model", str(pickles / "lm_safe"), "--engine", "vllm",
                                  "--output", str(tmp_path / "g.jsonl")], tmp_path, hide_checkout_env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and "python -m rlhf.generation.vllm_env" in p.stderr, p.stderr
    assert not (tmp_path / "g.jsonl").exists()


def test_missing_flash_attn_is_one_line_naming_its_install(pickles, monkeypatch):
    from policies.config import ModelConfig
    from policies.models import ModelLoadError, load_causal_lm

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    lm = str(pickles / "lm_safe")
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs the package flash_attn.*pip install flash-attn"):
        load_causal_lm(lm, ModelConfig(name_or_path=lm, attn_implementation="flash_attention_2"))
