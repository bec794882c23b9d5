"""A PPO run killed mid-way and resumed from its last checkpoint logs what a straight run logs."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from rewards import DigitReward
from safetensors.torch import load_file
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf import config, ppo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VOLATILE = ("time/", "tokens_per_second", "memory/")


def base_args(out, policy):
    return ["--model.name_or_path", policy, "--data.train", "builtin:quickstart_prompts", "--output_dir", str(out),
            "--ppo.steps", "6", "--ppo.learning_rate", "3e-3", "--ppo.max_new_tokens", "8",
            "--ppo.per_device_rollout_batch_size", "8", "--ppo.num_mini_batches", "2", "--ppo.temperature", "1.0",
            "--ppo.reward_normalization", "running", "--ppo.adaptive_kl", "true", "--ppo.kl_target", "0.5",
            "--sample_every", "0", "--save_steps", "2", "--reward.spec", "tests/rewards.py:digit_fraction_then_crash"]


def stable(history):
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in history]


ESTIMATOR_ARGS = {"gae": [], "grpo": ["--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "2"]}


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, sft_policy, monkeypatch, estimator):  # noqa: F811
    monkeypatch.chdir(REPO)
    args = lambda out, policy: base_args(out, policy) + ESTIMATOR_ARGS[estimator]  # noqa: E731
    straight = ppo.main(config.parse(ppo.PPOConfig, args(tmp_path / "straight", sft_policy), "t"), reward=DigitReward())

    out = tmp_path / "killed"
    # A fresh process, as after a real kill: not attached to this test process's W&B service.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"RLHF_TEST_CRASH_AT_CALL": "5", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    p = subprocess.run([sys.executable, "-m", "rlhf", "ppo", *args(out, sft_policy), "--tracking.report_to", "wandb"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 137, p.stderr[-2000:]  # died during step 5, after checkpoint-4
    assert sorted(os.listdir(out)).count("checkpoint-4") == 1 and not (out / "checkpoint-6").exists()
    run_id = (out / "wandb_run_id").read_text()

    monkeypatch.setenv("WANDB_MODE", "offline")
    resumed = ppo.main(config.parse(ppo.PPOConfig, args(out, sft_policy) + ["--resume", "latest",
                                    "--tracking.report_to", "wandb"], "t"), reward=DigitReward())
    assert stable(resumed) == stable(straight)
    # The linear schedule moves every step, so the equality above (lr, lr_critic of steps 5-6) shows the
    # scheduler restored from ppo_state.json continues where it stopped, not from its start.
    assert straight[5]["lr"] < straight[4]["lr"] < straight[3]["lr"] < straight[0]["lr"]
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 5 of the killed run is not logged twice
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    b = load_file(out / "checkpoint-6" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert (out / "wandb_run_id").read_text() == run_id  # the same W&B run continues
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2
