"""SFT and reward training on 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, LoRA and full,
each against a 1-process run at the same global batch; a two-node-shaped launch on loopback; the
launch flag; a mis-launch refused (../shared/docs/environment.md has the recipe these runs follow).

Equality, not closeness, is what the Trainer should give here: both runs see the same global batches
(the seeded sampler is drawn once, then each rank takes its half of every batch), the mean of the two
half-batch gradients is the full-batch gradient, and the logged loss is averaged over ranks. What is left
is float summation order (all-reduce vs one matmul over the whole batch): ~1e-7 relative, measured.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from rlhf.runtime import launch

pytest.importorskip("deepspeed")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 4
GLOBAL_BATCH = 8
COMMON = ["--train.max_steps", str(STEPS), "--train.logging_steps", "1", "--train.eval_steps", str(STEPS),
          "--train.warmup_steps", "0", "--data.max_samples", "64", "--data.validation_split", "0",
          "--train.learning_rate", "3e-3"]
STAGE_ARGS = {
    "sft": ["--config", "configs/sft_tiny.yaml"],
    "reward": ["--config", "configs/reward_tiny.yaml", "--model.name_or_path", "tiny", "--reward.normalize_on", "train",
               "--reward.normalize_samples", "16", "--train.per_device_eval_batch_size", "8"],
}


def run_stage(stage, method, out, num_processes=1, preset=None):
    """`rlhf <stage>` in a subprocess; with a preset, through `--accelerate PRESET --num_processes N`."""
    per_device = GLOBAL_BATCH // num_processes  # same global batch whatever the process count
    cmd = [sys.executable, "-m", "rlhf", stage, *STAGE_ARGS[stage], *COMMON, "--peft.method", method,
           "--train.per_device_train_batch_size", str(per_device), "--output_dir", str(out)]
    if preset is not None:
        cmd += ["--accelerate", preset, "--num_processes", str(num_processes)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def losses(out):
    """Training loss at each logged step, read back from the last checkpoint's trainer_state.json."""
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def load_saved(stage, method, out):
    """The saved output, loaded with plain transformers/peft on one process (LoRA merged, to compare)."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = {("sft", "full"): AutoModelForCausalLM, ("sft", "lora"): AutoPeftModelForCausalLM,
              ("reward", "full"): AutoModelForSequenceClassification,
              ("reward", "lora"): AutoPeftModelForSequenceClassification}[stage, method]
    model = loader.from_pretrained(str(out), **({"num_labels": 1} if stage == "reward" else {}))
    return (model.merge_and_unload() if method == "lora" else model).eval()


def outputs(model, x):
    """(logits or scores, last hidden state) of fixed inputs x (1, T)."""
    with torch.no_grad():
        o = model(input_ids=x, output_hidden_states=True)
    return o.logits, o.hidden_states[-1]


X = torch.tensor([[3, 40, 41, 42, 43, 44, 45]])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1-process references, one per (stage, method), run once."""
    done = {}

    def get(stage, method):
        if (stage, method) not in done:
            out = tmp_path_factory.mktemp(f"{stage}_{method}_1proc")
            run_stage(stage, method, out)
            done[stage, method] = out
        return done[stage, method]

    return get


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
@pytest.mark.parametrize("stage, preset, method", [
    ("sft", "ddp", "lora"), ("sft", "zero2", "full"), ("sft", "zero3", "lora"),
    ("reward", "ddp", "full"), ("reward", "zero2", "lora"), ("reward", "zero3", "full"),
])
def test_two_processes_equal_one(tmp_path, single, stage, preset, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    p = run_stage(stage, method, out, num_processes=2, preset=preset)
    assert f"--config_file {REPO / 'configs' / 'accelerate' / preset}.yaml --num_processes 2" in p.stderr
    args = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert args["train_batch_size"] == GLOBAL_BATCH // 2  # per device: 2 processes took half each
    ref = single(stage, method)
    two, one = losses(out), losses(ref)
    assert len(two) == STEPS and two == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert two[-1] != two[0]

    # Saved once, whole (ZeRO-3 gathered it), and loads on one process: same outputs as the 1-process model.
    assert not (out / ".final.tmp").exists()
    tuned, tuned_hidden = outputs(load_saved(stage, method, out), X)
    expected, _ = outputs(load_saved(stage, method, ref), X)
    assert torch.allclose(tuned, expected, atol=1e-4, rtol=1e-4), (tuned - expected).abs().max()
    _, base_hidden = outputs(AutoModelForCausalLM.from_pretrained(str(out / "base_model")), X)
    assert (tuned_hidden - base_hidden).abs().max() > 1e-3  # and it is trained, not the base
    if stage == "reward":
        info = json.loads((out / "reward_info.json").read_text())
        assert info["adapter"] == (method == "lora")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_two_node_shaped_launch_on_loopback(tmp_path, single):
    """The two_node preset, one process per 'machine', both machines on 127.0.0.1: the same command on
    each with its own --machine_rank, as the README's multi-node section says."""
    out = tmp_path / "out"
    port = str(free_port())
    cmd = ["accelerate", "launch", "--config_file", "configs/accelerate/two_node.yaml", "--num_machines", "2",
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
           "--machine_rank"]
    stage = ["-m", "rlhf", "sft", *STAGE_ARGS["sft"], *COMMON, "--peft.method", "lora",
             "--train.per_device_train_batch_size", str(GLOBAL_BATCH // 2), "--output_dir", str(out)]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    nodes = [subprocess.Popen(cmd + [str(rank)] + stage, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    # Both ranks joined: each trained on half of every global batch, and rank 0 alone saved.
    assert losses(out) == pytest.approx(losses(single("sft", "lora")), rel=1e-4, abs=1e-5)
    assert sum("sft done: saved to" in stdout for stdout, _ in results) == 1
    assert (out / "adapter_model.safetensors").exists() and not (out / ".final.tmp").exists()


def test_launch_command_for_trainer_stages():
    opts, rest = launch.split(["--config", "configs/reward_tiny.yaml", "--accelerate", "zero3",
                               "--num_processes", "2", "--peft.method", "lora"])
    cmd, env = launch.command("reward", opts, rest)
    assert cmd == ["accelerate", "launch", "--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml"),
                   "--num_processes", "2", "-m", "rlhf", "reward", "--config", "configs/reward_tiny.yaml",
                   "--peft.method", "lora"]
    assert env == {"RLHF_LAUNCHED": "1"}
    opts, rest = launch.split(["--accelerate", "two_node", "--machine_rank", "1", "--main_process_ip", "10.0.0.1"])
    cmd, _ = launch.command("sft", opts, rest)
    assert cmd[4:10] == ["--machine_rank", "1", "--main_process_ip", "10.0.0.1", "-m", "rlhf"]


@pytest.mark.parametrize("stage, config_cls, file", [("sft", "SFTConfig", "sft_tiny.yaml"),
                                                     ("reward_stage", "RewardConfig", "reward_tiny.yaml"),
                                                     ("classifier_stage", "ClassifierConfig", "classifier_tiny.yaml")])
def test_mislaunch_is_refused(tmp_path, monkeypatch, stage, config_cls, file):
    """WORLD_SIZE=2 while accelerate sees one process (e.g. `--multi_gpu` without a GPU, where each
    process believes it is alone): the stage refuses before loading anything, naming the command that works."""
    import importlib

    import accelerate

    from rlhf import config
    from rlhf.errors import UserError

    class OneProcess:  # what accelerate reports in that launch
        num_processes = 1

    cfg = config.parse(getattr(config, config_cls), ["--config", str(REPO / "configs" / file),
                                                     "--output_dir", str(tmp_path / "out")], "rlhf")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no gloo group to create: nobody to join
    monkeypatch.setattr(accelerate, "PartialState", OneProcess)
    with pytest.raises(UserError, match=r"WORLD_SIZE=2 but accelerate sees 1 process\(es\).*--multi_gpu"):
        importlib.import_module(f"rlhf.stages.{stage}").build(cfg)
    assert not (tmp_path / "out").exists()
