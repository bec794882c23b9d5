"""The vLLM rollout engine (`ppo.rollout_engine: vllm`) on CPU: weights in sync after updates (LoRA as an
adapter, full weights reloaded), a stale engine caught, the same sampling semantics and reward trend as the
HF engine, and resume. Needs a vLLM environment (`python -m rlhf.generation.vllm_env`, which the README's test
command runs): without one these tests skip, saying so.

The tiny model here is 128 wide with 4 heads: vLLM's CPU attention refuses the default tiny shape's
head dimension of 16."""

import math
import os
import shutil

import pytest
import torch
from conftest import REPO
from rewards import DigitReward

from rlhf import config, ppo
from rlhf.generation import vllm_engine as rollout_engine
from rlhf.generation.vllm_backend import VLLMBackend
from rlhf.generation.vllm_engine import EngineError, Sampling, VLLMConfig, VLLMEngine

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(rollout_engine.available() is None,
                                 reason="no vLLM environment (python -m rlhf.generation.vllm_env creates .venv-vllm)")]
TINY = ["--model.name_or_path", "tiny", "--model.tiny.hidden_size", "128", "--model.tiny.intermediate_size", "256"]


def ppo_args(out, *extra):
    return [*TINY, "--data.train", "builtin:quickstart_prompts", "--output_dir", str(out), "--sample_every", "0",
            "--ppo.per_device_rollout_batch_size", "16", "--ppo.num_mini_batches", "2", "--ppo.max_new_tokens", "10",
            "--ppo.temperature", "0.7", "--ppo.reward_normalization", "none", "--ppo.missing_eos_penalty", "None",
            "--ppo.critic_init", "policy", "--save_steps", "100", *extra]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from policies.config import TinyModelConfig
    from policies.tiny import save_tiny

    return save_tiny(TinyModelConfig(hidden_size=128, intermediate_size=256), tmp_path_factory.mktemp("m") / "tiny")


def hf_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_lora_adapter_sync_after_updates_and_stale_engine_detected(tiny_dir, tmp_path):
    """After k optimizer steps on a LoRA policy, the engine serving the written adapter scores a fixed
    response as the trainer does; the engine left on the previous adapter does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.generation.vllm_engine import write_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="policy")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    prompt, response = [1, 40, 41, 42, 43], [50, 60, 70, 80, 90, 100]
    engine = VLLMEngine(VLLMConfig(), str(tiny_dir), dtype="float32", max_model_len=64, seed=0, lora_rank=8,
                        log_path=tmp_path / "engine.log")
    try:
        diffs, stale = [], []
        for version in range(3):  # k = 0, 2, 4 updates
            engine.set_adapter(str(write_adapter(model, "policy", tmp_path / f"v{version}")), version)
            trainer = hf_logprobs(model, prompt, response)
            served = torch.tensor(engine.score([prompt], [response])[0])
            diffs.append((served - trainer).abs().max().item())
            for _ in range(2):  # two updates the engine does not see yet
                loss = -hf_logprobs_grad(model, prompt, response).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            stale.append((torch.tensor(engine.score([prompt], [response])[0]) - hf_logprobs(model, prompt, response))
                         .abs().max().item())
        assert max(diffs) < 1e-4, diffs  # in sync: float32 on CPU agrees to ~1e-6
        assert min(stale) > 1e-2, stale  # the same engine, two updates behind: visibly off
    finally:
        engine.close()


def hf_logprobs_grad(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_full_weights_reloaded_in_place(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.generation.vllm_engine import write_full_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    prompt, response = [1, 40, 41, 42], [50, 60, 70, 80]
    engine = VLLMEngine(VLLMConfig(), str(tiny_dir), dtype="float32", max_model_len=64, seed=0,
                        log_path=tmp_path / "engine.log")
    try:
        before = torch.tensor(engine.score([prompt], [response])[0])
        assert (before - hf_logprobs(model, prompt, response)).abs().max() < 1e-4
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        assert (before - hf_logprobs(model, prompt, response)).abs().max() > 1e-2  # the update matters
        engine.load_weights(str(write_full_weights(model, tmp_path / "w.safetensors")))
        after = torch.tensor(engine.score([prompt], [response])[0])
        assert (after - hf_logprobs(model, prompt, response)).abs().max() < 1e-4
    finally:
        engine.close()


def test_sampling_means_the_same_in_both_engines(tiny_dir, tmp_path):
    """Temperature: the engine's sampled-token logprobs are the trainer's at T (after the division); the
    stop token ends a response and is part of it; no stop token runs to max_new_tokens; the model's own
    generation_config (a repetition penalty) reaches neither engine."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    shipped = tmp_path / "penalised"
    shutil.copytree(tiny_dir, shipped)
    GenerationConfig(do_sample=True, repetition_penalty=1.5, top_k=3, eos_token_id=2).save_pretrained(shipped)
    model = AutoModelForCausalLM.from_pretrained(shipped)
    engine = VLLMEngine(VLLMConfig(), str(shipped), dtype="float32", max_model_len=64, seed=0,
                        log_path=tmp_path / "engine.log")
    try:
        prompts = [[1, 40 + i, 41, 42] for i in range(8)]
        tokens, lps = engine.generate(prompts, Sampling(0.7, 1.0, 12, None), list(range(8)))
        assert all(len(t) == 12 for t in tokens)  # no stop token: to max_new_tokens
        for p, t, lp in zip(prompts, tokens, lps):
            torch.testing.assert_close(torch.tensor(lp), hf_logprobs(model, p, t, 0.7), atol=1e-4, rtol=0)
        stop = tokens[0][3]  # a token the engine samples early for the first prompt with seed 0
        tokens, _ = engine.generate(prompts[:1], Sampling(0.7, 1.0, 12, stop), [0])
        assert tokens[0][-1] == stop and len(tokens[0]) == 4 and stop not in tokens[0][:-1]
    finally:
        engine.close()


def _trend(history):
    rows = [m for m in history if "objective/scores" in m]
    return sum(m["objective/scores"] for m in rows[:3]) / 3, sum(m["objective/scores"] for m in rows[-3:]) / 3


@pytest.fixture(scope="module")
def sft128(tmp_path_factory):
    """A tiny policy (width 128) that has learnt the synthetic tasks: 100 steps of the SFT quickstart (~16 s)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("sft128") / "policy"
    sft.main(config.parse(config.SFTConfig, ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--output_dir",
                                             str(out), *TINY[2:], "--train.max_steps", "100"], "t"))
    return str(out)


def test_ppo_with_vllm_matches_the_hf_engine_reward_trend(sft128, tmp_path, monkeypatch):
    """Same seed, same task (a quarter of the prompts have number answers; the reward is the response's
    share of digits): both engines raise the reward alike, and the vLLM engine serves the policy's
    weights at every step (measured: 0.17 -> 0.49 with hf, 0.18 -> 0.55 with vllm, logprob_diff <= 4e-7)."""
    monkeypatch.chdir(REPO)
    runs = {}
    for engine in ("hf", "vllm"):
        cfg = config.parse(ppo.PPOConfig, ppo_args(tmp_path / engine, "--model.name_or_path", sft128, "--ppo.steps", "20",
                                                   "--ppo.learning_rate", "3e-3", "--ppo.kl_coef", "0.02",
                                                   "--ppo.temperature", "1.0", "--ppo.rollout_engine", engine), "t")
        runs[engine] = ppo.main(cfg, reward=DigitReward())
    diffs = [m["rollout/logprob_diff"] for m in runs["vllm"]]
    assert len(diffs) == 20 and max(diffs) < 1e-4, diffs  # after every update: the policy's weights
    assert max(m["rollout/logprob_diff_max"] for m in runs["vllm"]) < 1e-3
    for engine, history in runs.items():
        first, last = _trend(history)
        assert last > first + 0.15, (engine, first, last)
    assert abs(_trend(runs["hf"])[1] - _trend(runs["vllm"])[1]) < 0.25  # within this task's seed noise
    assert (tmp_path / "vllm" / "policy" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_episodes_with_vllm_stay_in_sync_over_agent_tokens(sft128, tmp_path, monkeypatch, estimator):
    """Multi-turn episodes (the guessing game answers every reply) sampled by the vLLM engine, one request
    per turn, with the LoRA policy synced as an adapter: rollout/logprob_diff, measured on the agent's
    tokens only, stays at float noise after every update."""
    monkeypatch.chdir(REPO)
    extra = ["--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "2"] if estimator == "grpo" else []
    cfg = config.parse(ppo.PPOConfig, [
        "--model.name_or_path", sft128, "--env.spec", "rlhf.envs.guess_number:GuessNumber", "--data.train",
        "builtin:guess_train", "--output_dir", str(tmp_path / "o"), "--sample_every", "0", "--save_steps", "100",
        "--ppo.per_device_rollout_batch_size", "8", "--ppo.num_mini_batches", "2", "--ppo.max_new_tokens", "6",
        "--ppo.temperature", "1.0", "--ppo.steps", "3", "--ppo.learning_rate", "3e-3", "--ppo.critic_init", "policy",
        "--env.max_total_tokens", "96", "--ppo.rollout_engine", "vllm", *extra], "t")
    h = ppo.main(cfg)
    assert max(m["rollout/logprob_diff"] for m in h) < 1e-4 and max(m["rollout/logprob_diff_max"] for m in h) < 1e-3
    assert max(m["env/turns"] for m in h) > 1
    if estimator == "gae":  # the policy moved (with grpo, groups that all fail the game leave it in place)
        assert h[-1]["objective/kl"] != 0


def test_full_fine_tuning_with_vllm_stays_in_sync(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config.parse(ppo.PPOConfig, ppo_args(tmp_path / "o", "--peft.method", "full", "--ppo.steps", "4",
                                               "--ppo.learning_rate", "1e-3", "--ppo.rollout_engine", "vllm"), "t")
    h = ppo.main(cfg, reward=DigitReward())
    assert max(m["rollout/logprob_diff"] for m in h) < 1e-4
    assert h[-1]["objective/kl"] != 0  # the policy did move away from the reference (the sync is not trivial)
    assert not list(rollout_engine.run_root().glob(f"{rollout_engine.RUN_PREFIX}{os.getpid()}-*"))  # weights removed


def test_stale_engine_stops_the_run(tmp_path, monkeypatch):
    """An engine that is never given the updates is caught by rollout/logprob_diff and the run stops."""
    monkeypatch.chdir(REPO)
    synced = []
    real_sync = VLLMBackend.update_weights

    def sync_once(engine, version):
        if not synced:  # the initial weights only: every later update is withheld
            synced.append(version)
            real_sync(engine, version)

    monkeypatch.setattr(VLLMBackend, "update_weights", sync_once)
    cfg = config.parse(ppo.PPOConfig, ppo_args(tmp_path / "o", "--ppo.steps", "6", "--ppo.learning_rate", "2e-2",
                                               "--ppo.rollout_engine", "vllm"), "t")
    with pytest.raises(EngineError, match=r"step [1-5]: the sampled-token logprobs of the vLLM engine differ .* "
                                          r"above vllm.max_logprob_diff=0.05"):
        ppo.main(cfg, reward=DigitReward())


def test_vllm_run_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    """Each request's seed is a function of (seed, step, rank, index): a resumed run samples and scores
    what the straight run did."""
    monkeypatch.chdir(REPO)
    extra = ["--ppo.steps", "4", "--ppo.learning_rate", "3e-3", "--ppo.rollout_engine", "vllm", "--save_steps", "2"]
    straight = ppo.main(config.parse(ppo.PPOConfig, ppo_args(tmp_path / "a", *extra), "t"), reward=DigitReward())
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")  # as if killed after step 2
    resumed = ppo.main(config.parse(ppo.PPOConfig, ppo_args(tmp_path / "b", *extra, "--resume", "latest"), "t"),
                       reward=DigitReward())
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    keys = ("objective/scores", "objective/kl", "rollout/logprob_diff", "response/length")
    for a, b in zip(straight[2:], resumed[2:]):
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (k, a[k], b[k])


def test_missing_engine_environment_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config.parse(ppo.PPOConfig, ppo_args(tmp_path / "o", "--ppo.steps", "1", "--ppo.rollout_engine", "vllm",
                                               "--vllm.python", str(tmp_path / "nope" / "python")), "t")
    with pytest.raises(EngineError, match=r"vllm.python '.*nope/python' does not exist \(create an environment "
                                          r"with `python -m rlhf.generation.vllm_env`\)"):
        ppo.main(cfg, reward=DigitReward())
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def ppo_adapter(sft128, tmp_path_factory):
    """A LoRA policy on the width-128 SFT model after 3 PPO steps (HF engine)."""
    out = tmp_path_factory.mktemp("ppo128") / "run"
    ppo.main(config.parse(ppo.PPOConfig, ppo_args(out, "--model.name_or_path", sft128, "--ppo.steps", "3",
                                                  "--ppo.learning_rate", "1e-2"), "t"), reward=DigitReward())
    return str(out / "policy")


def test_generate_and_eval_policy_give_the_same_greedy_answers_with_either_engine(ppo_adapter, sft128, tmp_path,
                                                                                  monkeypatch):
    """Greedy decoding is deterministic: the vLLM engine (the adapter served on its base) must give the
    HF engine's answers, and `rlhf eval policy` the same report."""
    from rlhf.evaluation import eval_policy, generate

    monkeypatch.chdir(REPO)
    rows = {}
    for engine in ("hf", "vllm"):
        cfg = config.parse(generate.GenerateConfig, ["--model", ppo_adapter, "--prompts.train", "builtin:quickstart_prompts",
                                                     "--prompts.max_samples", "16", "--temperature", "0",
                                                     "--max_new_tokens", "12", "--engine", engine], "t")
        rows[engine] = generate.generate(cfg)
    assert [r["response"] for r in rows["hf"]] == [r["response"] for r in rows["vllm"]]
    assert sum(r["eos"] for r in rows["hf"]) >= 2  # some answers stop: the stop token means the same (4 of 16 seen)
    reports = {}
    for engine in ("hf", "vllm"):
        cfg = config.parse(eval_policy.EvalPolicyConfig, [
            "--policy", ppo_adapter, "--reference", sft128, "--reward.spec", "tests/rewards.py:digit_fraction",
            "--prompts.train", "builtin:quickstart_eval_prompts", "--prompts.max_samples", "16", "--temperature", "0",
            "--max_new_tokens", "12", "--engine", engine], "t")
        reports[engine] = eval_policy.evaluate(cfg)
    for key in ("win_rate", "reward_policy", "reward_reference", "length_policy", "eos_rate_reference"):
        assert reports["hf"][key] == pytest.approx(reports["vllm"][key], abs=1e-6), key


def test_generate_plays_the_same_greedy_episodes_with_either_engine(sft128, tmp_path, monkeypatch):
    """`rlhf generate --env.spec`: multi-turn episodes (one engine request per turn, the prompt the episode's
    ids so far) played greedy by the vLLM engine are the HF engine's, token for token, reward for reward."""
    from rlhf.evaluation import generate

    monkeypatch.chdir(REPO)
    records = {}
    for engine in ("hf", "vllm"):
        cfg = config.parse(generate.GenerateConfig, [
            "--model", sft128, "--env.spec", "rlhf.envs.guess_number:GuessNumber", "--prompts.train",
            "builtin:guess_eval", "--prompts.max_samples", "8", "--temperature", "0", "--max_new_tokens", "6",
            "--env.max_total_tokens", "96", "--engine", engine], "t")
        records[engine] = generate.generate(cfg)
    assert records["hf"] == records["vllm"]
    assert max(r["turns"] for r in records["hf"]) > 1  # the game answered and the agent spoke again


@pytest.mark.parametrize("kind, method", [("ddp", "lora"), ("zero3", "full")])
def test_two_processes_each_with_an_engine(kind, method, tmp_path):
    """2 CPU processes (DDP, or ZeRO-3 with full weights gathered for the sync), each with its own engine
    generating its own shard of the prompts: every step's logprob_diff stays at float32 agreement."""
    import json
    import subprocess

    from test_ppo_distributed import ENV, LAUNCH

    env = {**ENV, "ACCELERATE_USE_CPU": "true"} if kind == "ddp" else ENV
    out = tmp_path / "o"
    cmd = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *LAUNCH[kind], "-m", "rlhf", "ppo",
           *ppo_args(out, "--peft.method", method, "--ppo.steps", "3", "--ppo.per_device_rollout_batch_size", "8",
                     "--ppo.learning_rate", "1e-3", "--ppo.rollout_engine", "vllm",
                     "--reward.spec", "tests/rewards.py:digit_fraction")]
    before = set(rollout_engine.run_root().glob(f"{rollout_engine.RUN_PREFIX}*-*"))
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "2 process(es), rollout 16/step" in p.stdout
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3]
    assert max(m["rollout/logprob_diff"] for m in history) < 1e-4
    assert history[-1]["objective/kl"] != 0  # the policy moved: the syncs carried real updates
    assert (out / "vllm_engine_0.log").exists() and (out / "vllm_engine_1.log").exists()
    stale = set(rollout_engine.remove_stale_run_dirs(rollout_engine.run_root())) - before
    assert not stale, stale  # each rank's engine folder (with the full weights) was removed when it ended
