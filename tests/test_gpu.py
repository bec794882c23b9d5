"""On a CUDA GPU: each stage on the tiny model in bf16, and the Trainer stages under DeepSpeed ZeRO-2/3 with
one process. Skipped where no GPU exists (CI, the 2-core development machines); run with `pytest -m gpu`.

On a GPU that supports bf16, `model.dtype: auto` loads the weights in bf16 and `train.bf16: null` turns
bf16 on in the Trainer (SFT, reward, classifier); PPO's Accelerator takes bf16 mixed precision."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, sft_config
from test_ppo import sft_policy  # noqa: F401  (session fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(autouse=True)
def needs_bf16():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")


def logged_losses(trainer, key="loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def assert_bf16_and_learns(trainer):
    """bf16 in the Trainer and in the weights on the GPU; the training loss is finite and falls."""
    assert trainer.args.bf16
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    assert param.device.type == "cuda"
    assert any(p.dtype == torch.bfloat16 for p in trainer.model.parameters())  # the base weights, loaded in bf16
    trainer.train()
    losses = logged_losses(trainer)
    assert losses and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def test_sft_bf16(tmp_path):
    from rlhf.stages import sft

    trainer, _ = sft.build(sft_config(tmp_path, "--peft.method", "full", "--train.learning_rate", "3e-3",
                                      "--train.max_steps", "8"))
    assert_bf16_and_learns(trainer)


def test_reward_bf16(tmp_path):
    from test_reward_train import easy_pairs, reward_config

    from rlhf.stages import reward_stage

    data = easy_pairs(tmp_path / "pairs.jsonl")
    trainer, _ = reward_stage.build(reward_config(tmp_path, "--data.train", str(data), "--peft.method", "full",
                                                  "--train.learning_rate", "1e-3", "--train.max_steps", "12",
                                                  "--train.per_device_train_batch_size", "16"))
    assert_bf16_and_learns(trainer)


def test_classifier_bf16(tmp_path):
    from test_classifier import classifier_config, sentiment_rows, write_jsonl

    from rlhf.stages import classifier_stage

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(120))
    cfg = classifier_config(tmp_path, "--data.train", str(data), "--data.text_column", "text",
                            "--data.label_columns", "label", "--peft.method", "lora", "--peft.modules_to_save",
                            "None", "--train.learning_rate", "1e-2", "--train.max_steps", "12",
                            "--reward_label", "pos")
    trainer, *_ = classifier_stage.build(cfg)
    assert_bf16_and_learns(trainer)


def test_ppo_bf16(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    from rewards import DigitReward
    from test_ppo import ppo_config

    from rlhf import ppo
    from rlhf.runtime import distributed

    seen = {}
    make = distributed.make_accelerator

    def spy(*args, **kwargs):
        seen["accelerator"] = make(*args, **kwargs)
        return seen["accelerator"]

    monkeypatch.setattr(distributed, "make_accelerator", spy)
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.steps", "30", "--ppo.per_device_rollout_batch_size", "32",
                            "--ppo.kl_coef", "0.02"), reward=DigitReward())
    assert seen["accelerator"].mixed_precision == "bf16"
    assert all(math.isfinite(m["loss/policy"]) and math.isfinite(m["loss/value"]) for m in h)
    first = sum(m["objective/scores"] for m in h[:5]) / 5
    last = sum(m["objective/scores"] for m in h[-5:]) / 5
    assert last > first, (first, last)


def test_ppo_full_bf16_steps_float32_master_weights(tmp_path, sft_policy):  # noqa: F811
    """Full fine-tuning in bf16 on the GPU (dtype auto): every trained weight moves at lr 1e-5, sampling
    and scoring agree (no negative KL), the exported policy holds the float32 masters."""
    from rewards import DigitReward
    from safetensors.torch import load_file
    from test_ppo import ppo_config

    from rlhf import ppo

    before = load_file(f"{sft_policy}/model.safetensors")
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--peft.method", "full", "--ppo.learning_rate", "1e-5",
                            "--ppo.steps", "3"), reward=DigitReward())
    assert all(m["objective/kl"] > -0.05 for m in h)  # no off-policy bias pushing the k1 estimate negative
    after = load_file(tmp_path / "ppo" / "policy" / "model.safetensors")
    layers = [k for k in before if ".layers." in k]
    changed = sum((after[k].float() != before[k].float()).sum().item() for k in layers)
    assert after[layers[0]].dtype == torch.float32
    assert changed / sum(before[k].numel() for k in layers) > 0.95


@pytest.mark.parametrize("preset, method", [("zero2", "full"), ("zero3", "full"), ("zero3", "lora")])
def test_sft_under_deepspeed_one_process(tmp_path, preset, method):
    """ZeRO-2/3 through the launch flag with one GPU process: bf16 DeepSpeed engine, the loss falls, and the
    saved output (gathered under ZeRO-3) loads with plain transformers/peft."""
    pytest.importorskip("deepspeed")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "rlhf", "sft", "--config", "configs/sft_tiny.yaml", "--output_dir", str(out),
           "--peft.method", method, "--train.max_steps", "8", "--train.logging_steps", "1", "--train.eval_steps", "8",
           "--train.warmup_steps", "0", "--data.max_samples", "128", "--data.validation_split", "0",
           "--train.per_device_train_batch_size", "8", "--train.learning_rate", "3e-3" if method == "full" else "1e-2",
           "--accelerate", preset, "--num_processes", "1"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    history = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    loader = AutoModelForCausalLM if method == "full" else AutoPeftModelForCausalLM
    x = torch.tensor([[3, 40, 41, 42, 43]])
    with torch.no_grad():
        tuned = loader.from_pretrained(str(out)).eval()(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))(input_ids=x).logits
    assert torch.isfinite(tuned).all() and (tuned.float() - base.float()).abs().max() > 1e-3

