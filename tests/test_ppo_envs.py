"""PPO on multi-turn environments: the agent's tokens are the only actions (environment tokens get no
loss, no KL, no gradient), rewards sit where the environment gave them, and a killed run resumes exactly."""

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf import config, ppo
from rlhf.generation.engine import finish
from rlhf.generation.prompts import left_pad
from rlhf.ppo import models, trainer
from rlhf.ppo.metrics import Stopwatch
from rlhf.ppo.rollout import Rollout, make_rollout
from rlhf.ppo.update import ppo_update

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VOLATILE = ("time/", "tokens_per_second", "memory/")
ENVS = {"calculator": ("rlhf.envs.calculator:Calculator", "builtin:calc_train"),
        "guess": ("rlhf.envs.guess_number:GuessNumber", "builtin:guess_train"),
        "seeded_guess": ("tests/agent_envs.py:SeededGuess", "builtin:guess_train")}


class ScriptedEngine:
    """An engine that plays a fixed strategy (so every episode is multi-turn): the calculator is called,
    then its result copied; numbers are guessed 1, 2, 3, ... Each reply is its text's tokens + EOS."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def reply(self, prompt: list[int]) -> str:
        text = self.tok.decode(prompt)
        if m := re.search(r"What is (\d+) \* (\d+)\?", text):
            results = re.findall(r"tool\W+(-?[\d ]*\d)", text)  # `1 3 6 3` (spaced digits) or `1363`
            return results[-1] if results else f"calc {m.group(1)} * {m.group(2)}"
        return str(1 + text.count("<|assistant|>") - 1)

    def generate(self, prompts, sampling, seed=None):
        responses = [self.tok.encode(self.reply(p), add_special_tokens=False) + [sampling.stop_id] for p in prompts]
        ids, mask = left_pad(prompts, self.tok.pad_token_id)
        width = max(map(len, responses))
        out = torch.full((len(prompts), width), self.tok.pad_token_id)
        for b, r in enumerate(responses):
            out[b, :len(r)] = torch.tensor(r)
        return finish(ids, mask, out, None, sampling.stop_id, self.tok.pad_token_id)

    def update_weights(self, version):
        pass

    def close(self):
        pass


def env_config(tmp_path, policy, spec, data, *args):
    return config.parse(ppo.PPOConfig, [
        "--model.name_or_path", policy, "--env.spec", spec, "--data.train", data, "--output_dir", str(tmp_path),
        "--ppo.steps", "2", "--ppo.learning_rate", "3e-3", "--ppo.max_new_tokens", "8",
        "--ppo.per_device_rollout_batch_size", "8", "--ppo.num_mini_batches", "2", "--ppo.ppo_epochs", "1",
        "--ppo.temperature", "1.0", "--sample_every", "0", "--save_steps", "1000", "--env.max_total_tokens", "120",
        *args], "t")


def garbled(r: Rollout, where: torch.Tensor) -> Rollout:
    """`r` with every per-token input of the loss replaced by noise at the positions `where` (B, A) (finite
    ratios: an exp overflow at a masked position would make NaN gradients through torch.where)."""
    g = torch.Generator().manual_seed(0)
    noise = lambda t: None if t is None else torch.where(where, 3 * torch.randn(t.shape, generator=g), t)  # noqa: E731
    fields = {k: getattr(r, k) for k in Rollout.__dataclass_fields__}
    for k in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
        fields[k] = noise(fields[k])
    return Rollout(**fields)


# GRPO needs outcomes that differ within a group: the seeded game hides another number in each copy of a row
@pytest.mark.parametrize("estimator,env", [("gae", "calculator"), ("gae", "guess"), ("grpo", "seeded_guess")])
def test_only_agent_tokens_are_trained_and_rewards_sit_at_turn_ends(tmp_path, sft_policy, monkeypatch, env,  # noqa: F811
                                                                    estimator):
    monkeypatch.chdir(REPO)
    spec, data = ENVS[env]
    extra = ["--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "2"] if estimator == "grpo" else []
    cfg = env_config(tmp_path, sft_policy, spec, data, "--ppo.missing_eos_penalty", "0.5", "--env.max_turns", "8", *extra)
    monkeypatch.setattr(models, "start_engine", lambda cfg, model, acc, tok, base: ScriptedEngine(tok))
    with ExitStack() as cleanup:
        s = trainer.setup(cfg, None, cleanup)
        r = make_rollout(s, trainer.step_prompts(s, 0), 0, Stopwatch())
        tok, eos = s.tokenizer, s.tokenizer.eos_token_id
        ep = r.episodes
        assert (ep.turns >= 2).all()  # every episode took several agent turns
        if env == "calculator":
            assert (ep.tool_calls == 1).all() and ep.success.all()
        for b in range(len(r.responses)):
            real = r.responses[b][r.response_mask[b]]
            acts = r.action_mask[b][r.response_mask[b]]
            # the actions are exactly the scripted turns (text + EOS); the rest are the encoded replies
            agent_turns = [m["content"] for m in ep.transcripts[b] if m["role"] == "assistant"]
            assert tok.decode(real[acts]) == "".join(t + tok.eos_token for t in agent_turns)
            assert (~acts).any()
            # each turn's reward at that turn's EOS (the last action before a reply), the rest 0
            ends = acts & ~torch.cat([acts[1:], torch.tensor([False])])
            assert (real[ends] == eos).all() and int(ends.sum()) == ep.turns[b]
            tr = r.turn_rewards[b][r.response_mask[b]]
            assert tr[~ends].eq(0).all() and tr[ends].sum() == ep.returns[b]
            if ep.success[b]:  # the winning turn is the last one
                assert tr[ends][-1] == 1
            assert (r.kl[b][~r.action_mask[b]] == 0).all()
        # per-token rewards: -kl_coef x KL + the turn rewards on actions (no episode cut: no penalty), 0 elsewhere
        assert r.contains_eos.all()
        expected = -s.kl_ctl.value * r.kl + r.turn_rewards
        assert torch.allclose(r.rewards[r.action_mask], expected[r.action_mask])
        assert (r.rewards[~r.action_mask] == 0).all() and (r.advantages[~r.action_mask] == 0).all()
        assert r.raw_scores.tolist() == ep.returns.tolist()

        # the update ignores everything at environment positions, and not at agent positions
        params = dict(enumerate(q for group in s.optimizer.param_groups for q in group["params"]))  # both adapters
        start = {n: q.detach().clone() for n, q in params.items()}
        opt, sched = s.optimizer.state_dict(), s.scheduler.state_dict()

        def update(rollout):
            import copy

            with torch.no_grad():
                for n, q in params.items():
                    q.copy_(start[n])
            s.optimizer.load_state_dict(copy.deepcopy(opt))
            s.scheduler.load_state_dict(sched)
            ppo_update(s.accelerator, s.model, s.optimizer, s.scheduler, rollout, cfg.ppo, s.sizes,
                       torch.Generator().manual_seed(1))
            return {n: q.detach().clone() for n, q in params.items()}

        update(r)  # the first update after setup moves the critic adapter slightly differently from a repeat
        plain = update(r)
        env_positions = r.response_mask & ~r.action_mask
        noisy_env = update(garbled(r, env_positions))
        noisy_agent = update(garbled(r, r.action_mask))
        assert any(not torch.equal(plain[n], start[n]) for n in params)
        assert all(torch.equal(plain[n], noisy_env[n]) for n in params)
        assert any(not torch.allclose(plain[n], noisy_agent[n]) for n in params)


def test_truncated_episode_is_penalised_like_a_reply_without_eos(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    """An episode cut by env.max_turns gets -missing_eos_penalty at its last agent token."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"high": 8, "target": t}) + "\n" for t in range(1, 9)))
    cfg = env_config(tmp_path, sft_policy, ENVS["guess"][0], str(data), "--ppo.missing_eos_penalty", "0.5",
                     "--env.max_turns", "2", "--ppo.kl_coef", "0")
    monkeypatch.setattr(models, "start_engine", lambda cfg, model, acc, tok, base: ScriptedEngine(tok))
    with ExitStack() as cleanup:
        s = trainer.setup(cfg, None, cleanup)
        r = make_rollout(s, trainer.step_prompts(s, 0), 0, Stopwatch())
    cut = r.episodes.truncated
    assert cut.sum() == 6  # targets 1 and 2 are found within 2 guesses, the others are cut
    assert (r.contains_eos == ~cut).all()
    last = torch.where(r.action_mask, torch.arange(r.action_mask.shape[1]), -1).max(1).values
    final = r.rewards[torch.arange(len(last)), last]
    assert torch.equal(final, r.turn_rewards[torch.arange(len(last)), last] - 0.5 * cut.float())
    assert r.rewards.sum(1).tolist() == (r.episodes.returns - 0.5 * cut.float()).tolist()


def test_env_run_logs_episode_metrics_and_held_out_success(tmp_path, sft_policy):  # noqa: F811
    cfg = env_config(tmp_path, sft_policy, *ENVS["guess"], "--eval.prompts", "builtin:guess_eval",
                     "--eval.max_prompts", "8", "--eval.greedy", "false")
    history = ppo.main(cfg)
    rows = [m for m in history if "env/success" in m]
    assert len(rows) == 2
    for m in rows:
        assert 1 <= m["env/turns"] <= cfg.env.max_turns and 0 <= m["env/success"] <= 1
        assert m["env/return"] == m["objective/scores"]  # the guessing game's reward is its success
        assert m["env/success"] == m["env/return"]
    evals = [m for m in history if "eval/success" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert all(m["eval/reward"] == m["eval/success"] and m["eval/turns"] >= 1 for m in evals)
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(s["transcript"][0]["role"] == "user" and s["reward"] in (0, 1) for s in samples)


def test_killed_env_run_resumes_to_the_same_metrics(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    monkeypatch.chdir(REPO)
    args = lambda out: ["--model.name_or_path", sft_policy, "--env.spec", "tests/agent_envs.py:SeededGuess",  # noqa: E731
                        "--data.train", "builtin:guess_train", "--output_dir", str(out), "--ppo.steps", "6",
                        "--ppo.learning_rate", "3e-3", "--ppo.max_new_tokens", "6",
                        "--ppo.per_device_rollout_batch_size", "8", "--ppo.num_mini_batches", "2",
                        "--ppo.temperature", "1.0", "--sample_every", "0", "--save_steps", "2",
                        "--env.max_total_tokens", "96"]
    straight = ppo.main(config.parse(ppo.PPOConfig, args(tmp_path / "straight"), "t"))
    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"RLHF_TEST_CRASH_AT_RESET": str(4 * 8 + 1), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    p = subprocess.run([sys.executable, "-m", "rlhf", "ppo", *args(out)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 137, p.stderr[-2000:]  # died starting step 5's episodes, after checkpoint-4
    assert (out / "checkpoint-4").exists() and not (out / "checkpoint-6").exists()
    resumed = ppo.main(config.parse(ppo.PPOConfig, args(out) + ["--resume", "latest"], "t"))
    stable = lambda h: [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in h]  # noqa: E731
    assert stable(resumed) == stable(straight)
    assert max(m["env/turns"] for m in straight) > 1
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    b = load_file(out / "checkpoint-6" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)



def test_agent_quickstart_pipeline_at_tiny_size(tmp_path):
    """`rlhf pipeline --config configs/agent_quickstart.yaml`, shortened: SFT on the calculator
    demonstrations, PPO in the environment with no reward stage, a report with held-out success before/after."""
    out = tmp_path / "agent"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", "--config", "configs/agent_quickstart.yaml",
                        "--output_dir", str(out), "--sft.train.max_steps", "30", "--sft.train.eval_steps", "30",
                        "--ppo.ppo.steps", "2", "--ppo.eval.max_prompts", "16", "--ppo.eval.every", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert not (out / "reward").exists()  # the environment is the reward
    report = json.loads((out / "report.json").read_text())
    held = report["heldout"]
    assert held["eval_reward"] == "success in rlhf.envs.calculator:Calculator"
    assert (held["before_step"], held["after_step"]) == (0, 2)
    for side in (held["before"], held["after"]):
        assert 0 <= side["eval/success"] <= 1 and side["eval/reward"] == side["eval/success"]
        assert side["eval/turns"] >= 1 and "eval/tool_calls" in side and side["eval/tokens"] > 0
    assert held["before"]["eval/kl"] == 0 and held["after"]["eval/kl"] != 0
    assert report["samples"] and all(s["prompt"].startswith("What is ") for s in report["samples"])


def test_resume_gives_each_rank_its_seed_stream_and_refuses_another_process_count(tmp_path):
    """A checkpoint holds every rank's episode seed stream: rank r resumes rank r's, and a resume with
    another number of processes (whose ranks would have no stream, or another's) is a one-line error."""
    import random
    from types import SimpleNamespace

    from rlhf.envs.config import EnvConfig
    from rlhf.envs.episodes import EnvPool
    from rlhf.errors import UserError
    from rlhf.ppo import checkpoint
    from rlhf.runtime import checkpoints
    from rlhf.runtime.distributed import all_ranks

    cfg = EnvConfig(spec=ENVS["calculator"][0])
    saved = [EnvPool(cfg, 0, rank) for rank in (0, 1)]
    for pool in saved:
        pool.rng.random()  # a stream part-way through
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    for rank in (0, 1):
        checkpoints.save_rng_state(ckpt, rank)
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({
        "step": 2, "history": [], "scheduler": {}, "kl_ctl": {}, "reward_moments": {},
        "env": all_ranks(saved[0].state_dict()) + [saved[1].state_dict()]}))  # one process: [rank 0's]
    keeps = SimpleNamespace(load_state_dict=lambda state: None)  # scheduler, KL controller, reward moments

    def resume(rank, world):
        acc = SimpleNamespace(load_state=lambda d: None, process_index=rank, num_processes=world,
                              print=lambda *a: None)
        pool = EnvPool(cfg, 99, rank)  # another seed: only the checkpoint can give it the saved stream
        state = random.getstate()
        try:
            checkpoint.resume(acc, str(ckpt), keeps, keeps, keeps, pool)
        finally:
            random.setstate(state)
        return pool.rng.random()

    assert [resume(rank, 2) for rank in (0, 1)] == [pool.rng.random() for pool in saved]
    with pytest.raises(UserError, match=r"holds the episode seed streams of 2 process\(es\); resume it with 2, not 1"):
        resume(0, 1)
