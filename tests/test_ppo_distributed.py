"""PPO with 2 CPU processes: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (gloo; ../shared/docs/environment.md)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf.errors import UserError
from rlhf.runtime.checkpoints import refuse_unsafe_pickles
from rlhf.runtime.distributed import check_world_size

pytest.importorskip("deepspeed")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONWARNINGS": "ignore"}

LAUNCH = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", "configs/accelerate/ds_zero2.json"],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", "configs/accelerate/ds_zero3.json"],
}


def launch(kind, out, policy, method, *extra):
    env = {**ENV, "ACCELERATE_USE_CPU": "true"} if kind == "ddp" else ENV
    cmd = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *LAUNCH[kind], "-m", "rlhf", "ppo", "--model.name_or_path", policy,
           "--data.train", "builtin:quickstart_prompts", "--output_dir", str(out), "--peft.method", method,
           "--ppo.steps", "3", "--ppo.max_new_tokens", "8", "--ppo.per_device_rollout_batch_size", "8",
           "--ppo.num_mini_batches", "2", "--ppo.learning_rate", "3e-3", "--ppo.temperature", "1.0",
           "--reward.spec", "tests/rewards.py:digit_fraction", "--sample_every", "0", "--save_steps", "3", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
@pytest.mark.parametrize("kind, method, estimator", [
    ("ddp", "lora", "gae"), ("zero2", "lora", "gae"), ("zero3", "full", "gae"), ("zero3", "lora", "gae"),
    ("ddp", "lora", "grpo"), ("zero3", "full", "rloo")])  # critic-free: no critic group, model or adapter
def test_two_process_ppo(tmp_path, sft_policy, kind, method, estimator):  # noqa: F811
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    p = launch(kind, out, sft_policy, method, "--ppo.advantage_estimator", estimator,
               "--ppo.samples_per_prompt", "1" if estimator == "gae" else "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert (out / "critic").exists() == (estimator == "gae")
    assert "2 process(es), rollout 16/step" in p.stdout  # both ranks take part, each with its own prompts
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(0 <= m["objective/scores"] <= 1 and m["objective/kl"] > -1 for m in history)
    assert history[-1]["objective/kl"] != 0  # the policy moved away from the reference
    # Its checkpoint (DeepSpeed's own files under ZeRO) holds nothing a resume would refuse as code.
    refuse_unsafe_pickles(out / "checkpoint-3")
    assert not list((out / "checkpoint-3").glob("*.pkl")) and (out / "checkpoint-3" / "rng_state_1.json").exists()
    # The exported policy is whole (ZeRO-3 gathered it) and loads on one process.
    x = torch.tensor([[3, 40, 41, 42]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(sft_policy)(input_ids=x).logits
        loader = AutoModelForCausalLM if method == "full" else AutoPeftModelForCausalLM
        tuned = loader.from_pretrained(out / "policy")(input_ids=x).logits
    assert tuned.shape == base.shape and (tuned - base).abs().max() > 1e-4


def test_world_size_mismatch_is_refused():
    check_world_size(2, 2)
    with pytest.raises(UserError, match=r"WORLD_SIZE=2 but accelerate sees 1 process\(es\)"):
        check_world_size(2, 1)


EQUAL = ("objective/scores", "objective/scores_normalized", "objective/kl", "objective/non_score_reward",
         "objective/rlhf_reward", "response/length", "response/eos_rate", "policy/advantages_mean",
         "policy/advantages_std", "policy/entropy", "val/mean", "val/returns_mean", "val/explained_variance",
         "policy/grad_norm", "val/grad_norm")


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_two_processes_equal_one(tmp_path, sft_policy):  # noqa: F811
    """DDP on 2 CPU processes against 1 process at the same global batch (16 responses a step): each rank
    rolls out its half of the step's prompts, the advantages are whitened and the reward normalised over
    both halves, and the loss is a token mean over the global batch, so metrics and weights agree up to
    float summation order. Two settings make the comparison exact rather than statistical: top_p 1e-6
    keeps only the most likely token (a response is a function of its prompt, not of which process's
    random stream drew it), and one mini-batch per epoch (with two, each process would shuffle its own
    half into a different split than one process shuffles the whole). The update's loss statistics are
    left out: each process logs the mean of its own micro-batches' token means, not the global one.
    (Before this test, a CPU launch left accelerate at DistributedType.NO: no DDP, no gather.)"""
    from safetensors.torch import load_file

    args = ["--model.name_or_path", sft_policy, "--data.train", "builtin:quickstart_prompts", "--ppo.steps", "3",
            "--ppo.max_new_tokens", "8", "--ppo.num_mini_batches", "1", "--ppo.learning_rate", "3e-3",
            "--ppo.temperature", "1.0", "--ppo.top_p", "1e-6", "--reward.spec", "tests/rewards.py:digit_fraction",
            "--sample_every", "0", "--save_steps", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.run([sys.executable, "-m", "rlhf", "ppo", *args, "--ppo.per_device_rollout_batch_size", "16",
                         "--output_dir", str(one)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p1.returncode == 0, p1.stdout[-2000:] + p1.stderr[-4000:]
    p2 = subprocess.run(["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                         "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "rlhf", "ppo", *args,
                         "--ppo.per_device_rollout_batch_size", "8", "--output_dir", str(two)],
                        env={**ENV, "ACCELERATE_USE_CPU": "true"}, cwd=REPO, capture_output=True, text=True,
                        timeout=600)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-4000:]
    assert "2 process(es), rollout 16/step" in p2.stdout and "1 process(es), rollout 16/step" in p1.stdout
    h1, h2 = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [m["step"] for m in h1] == [m["step"] for m in h2] == [1, 2, 3]
    for a, b in zip(h1, h2):
        for k in EQUAL:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])
    assert h1[-1]["objective/kl"] > 1e-3  # the policy moved: the runs compare real updates
    for part in ("policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
                 "critic/value_head.safetensors"):
        w1, w2 = load_file(one / part), load_file(two / part)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_two_process_env_run_resumes_exactly_with_a_seed_stream_per_rank(tmp_path):
    """DDP on 2 CPU processes in the calculator environment: each rank starts its episodes from seeds of its
    own stream (one shared stream would play the same episode seeds on both ranks), and each rank's stream
    position is in the checkpoint: resumed after step 2, both ranks start the episodes the straight run
    started, and the run logs what it logged."""
    def run(out, *extra):
        log = tmp_path / f"{out.name}_resets"
        cmd = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--multi_gpu", "-m", "rlhf", "ppo", "--model.name_or_path", "tiny",
               "--env.spec", "tests/agent_envs.py:RecordingCalculator", "--data.train", "builtin:calc_train",
               "--output_dir", str(out), "--ppo.steps", "4", "--save_steps", "2", "--ppo.max_new_tokens", "6",
               "--ppo.per_device_rollout_batch_size", "4", "--ppo.num_mini_batches", "1", "--ppo.learning_rate",
               "3e-3", "--ppo.temperature", "1.0", "--env.max_total_tokens", "40", "--sample_every", "0", *extra]
        p = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "true", "RLHF_TEST_RESET_LOG": str(log)}, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        assert "2 process(es), rollout 8/step" in p.stdout
        seeds = [[json.loads(line)["seed"] for line in open(f"{log}.{rank}")] for rank in (0, 1)]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return seeds, metrics

    (seeds0, seeds1), straight = run(tmp_path / "straight")
    assert len(seeds0) == len(seeds1) == 4 * 4  # 4 steps of 4 episodes on each rank
    assert not set(seeds0) & set(seeds1)  # the ranks' episodes start from seeds of their own
    resumed_dir = tmp_path / "resumed"  # as if killed after step 2: its checkpoint-2 is the straight run's
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    (r0, r1), resumed = run(resumed_dir, "--resume", "latest")
    assert (r0, r1) == (seeds0[8:], seeds1[8:])  # steps 3 and 4 start, on each rank, the straight run's episodes
    stable = lambda h: [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_second", "memory/"))}  # noqa: E731
                        for m in h]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert stable(resumed) == stable(straight)
