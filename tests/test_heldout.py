"""Held-out evaluation during PPO (the `eval` block) and several samples per prompt: the metrics are
logged before, along and after the run, evaluating never changes the training run, the hacking
warning fires when a short-answer reward is judged by one that pays for length, and a rollout batch
holds each prompt samples_per_prompt times."""

import json
import warnings

import pytest
import torch
from rewards import DigitReward
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

from rlhf import ppo
from rlhf.errors import UserError
from rlhf.evaluation.heldout import reward_hacking


def test_reward_hacking_rule():
    # proxy up, held-out down by more than 2 s.e. of the newest evaluation: flagged
    assert reward_hacking([0.1, 0.5, 0.9], [0.8, 0.6, 0.4], [0.1, 0.1, 0.05], window=3)
    assert not reward_hacking([0.1, 0.5, 0.9], [0.8, 0.6, 0.72], [0.1, 0.1, 0.05], window=3)  # fell 0.08 < 2 s.e.
    assert not reward_hacking([0.9, 0.5, 0.1], [0.8, 0.6, 0.4], [0.1, 0.1, 0.05], window=3)  # proxy fell too
    assert not reward_hacking([0.1, 0.5, 0.9], [0.4, 0.6, 0.8], [0.1, 0.1, 0.05], window=3)  # both rose
    assert not reward_hacking([0.1, 0.9], [0.8, 0.4], [0.01, 0.01], window=3)  # window not filled yet
    # only the last `window` evaluations count
    assert not reward_hacking([0.0, 0.1, 0.5, 0.9], [0.0, 0.8, 0.9, 0.95], [0.1] * 4, window=3)


def test_agreement_is_the_auc_for_a_binary_judge():
    from rlhf.evaluation.heldout import agreement

    assert agreement([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert agreement([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert agreement([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert agreement([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]) == 1.0  # graded judges: every ordered pair counts
    assert agreement([1.0, 2.0], [1.0, 1.0]) != agreement([1.0, 2.0], [1.0, 1.0])  # nan: nothing to order


def eval_args(tmp_path, every="2", *extra, questions=None):
    prompts = tmp_path / "heldout.jsonl"
    questions = questions or [f"What number comes after {n}?" for n in range(12)]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return ["--eval.prompts", str(prompts), "--eval.every", every, "--eval.max_prompts", "10", *extra]


class Recorder(DigitReward):
    """DigitReward that remembers the prompts it scored."""

    def __init__(self):
        self.seen = []

    def score(self, prompts, responses, normalize=False):
        self.seen.append([p[-1]["content"] for p in prompts])
        return super().score(prompts, responses, normalize)


def test_eval_block_logs_and_does_not_change_training(tmp_path, sft_policy):  # noqa: F811
    plain = ppo.main(ppo_config(tmp_path / "a", sft_policy, "--ppo.steps", "5"), reward=DigitReward())
    rec = Recorder()
    cfg = ppo_config(tmp_path / "b", sft_policy, "--ppo.steps", "5",
                     *eval_args(tmp_path, "2", "--eval.reward.spec", "tests/rewards.py:digit_fraction"))
    with_eval = ppo.main(cfg, reward=rec)
    # evaluations before the first iteration, every 2, and after the last
    assert [m["step"] for m in with_eval if "eval/reward" in m] == [0, 2, 4, 5]
    train = [m for m in with_eval if "objective/scores" in m]
    volatile = ("time/", "tokens_per_second", "memory/")
    for a, b in zip(plain, train):  # the evaluation's sampling runs in a forked RNG
        assert {k: v for k, v in a.items() if not k.startswith(volatile)} == \
               {k: v for k, v in b.items() if not k.startswith(volatile) and not k.startswith("eval/")}
    first = with_eval[0]
    assert first["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # the starting policy is the reference
    # the judge is digit_fraction, as is the proxy here: the two columns agree
    assert first["eval/reward"] == pytest.approx(first["eval/proxy"])
    for key in ("eval/greedy/reward", "eval/length", "eval/eos_rate", "eval/reward_stderr", "eval/hacking"):
        assert key in first
    # the held-out prompts were scored (the proxy saw them), 10 of the 12 (max_prompts)
    heldout = {f"What number comes after {n}?" for n in range(12)}
    scored = [set(batch) for batch in rec.seen if set(batch) <= heldout]
    assert scored and all(len(s) == 10 for s in scored)
    logged = [json.loads(line) for line in (tmp_path / "b" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert logged == with_eval
    samples = [json.loads(line) for line in (tmp_path / "b" / "ppo" / "eval_samples.jsonl").read_text().splitlines()]
    assert {(r["step"], r["mode"]) for r in samples} == {(s, m) for s in (0, 2, 4, 5) for m in ("sampled", "greedy")}
    assert len(samples) == 4 * 2 * 10


class ShortAnswers:
    """Pays for short answers (the proxy a policy can game)."""

    def score(self, prompts, responses, normalize=False):
        return torch.tensor([-len(r) / 10 for r in responses], dtype=torch.float32)


def test_hacking_warning_fires(tmp_path, sft_policy):  # noqa: F811
    fn = tmp_path / "judge.py"
    fn.write_text("def long_answers(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    cfg = ppo_config(tmp_path, sft_policy, "--ppo.steps", "12", "--ppo.per_device_rollout_batch_size", "32",
                     "--ppo.kl_coef", "0.0", "--ppo.max_new_tokens", "16",
                     *eval_args(tmp_path, "3", "--eval.reward.spec", f"{fn}:long_answers", "--eval.greedy", "false",
                                questions=[f"Repeat {w} 4 times." for w in ("cat", "dog", "sun", "moon", "tree", "bird",
                                                                           "fish", "star", "rain", "snow")]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = ppo.main(cfg, reward=ShortAnswers())
    evals = [m for m in h if "eval/reward" in m]
    assert evals[-1]["eval/length"] < evals[0]["eval/length"]  # the proxy was gamed: shorter answers
    assert evals[-1]["eval/reward"] < evals[0]["eval/reward"] and evals[-1]["eval/proxy"] > evals[0]["eval/proxy"]
    assert any(m["eval/hacking"] == 1.0 for m in evals)
    assert any("possible reward hacking" in str(w.message) for w in caught)


def test_eval_block_errors(tmp_path, sft_policy):  # noqa: F811
    with pytest.raises(UserError, match="eval.every"):
        ppo.main(ppo_config(tmp_path, sft_policy, *eval_args(tmp_path, "0")), reward=DigitReward())
    with pytest.raises(UserError, match="eval.temperature"):
        ppo.main(ppo_config(tmp_path, sft_policy, *eval_args(tmp_path, "2", "--eval.temperature", "0")),
                 reward=DigitReward())


def test_samples_per_prompt_multiplies_the_rollout(tmp_path, sft_policy):  # noqa: F811
    rec = Recorder()
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.samples_per_prompt", "4", "--ppo.steps", "3"), reward=rec)
    assert len(h) == 3
    rollouts = [batch for batch in rec.seen if len(batch) == 16]
    assert len(rollouts) == 3
    for batch in rollouts:  # 16 responses = 4 distinct prompts x 4 samples, each prompt's samples in a row
        groups = [batch[i:i + 4] for i in range(0, 16, 4)]
        assert all(len(set(g)) == 1 for g in groups)
        assert len({g[0] for g in groups}) == 4
    # consecutive steps walk through the data: no prompt repeats across the 3 batches within an epoch
    firsts = [b[i] for b in rollouts for i in range(0, 16, 4)]
    assert len(set(firsts)) == len(firsts)
    with pytest.raises(UserError, match="multiple of ppo.samples_per_prompt"):
        ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.samples_per_prompt", "3"), reward=DigitReward())


def test_low_eos_rate_warns_from_the_first_step(tmp_path, sft_policy):  # noqa: F811
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.steps", "1", "--ppo.max_new_tokens", "1"),
                     reward=DigitReward())
    assert h[0]["response/eos_rate"] < 0.5
    assert any("raise ppo.max_new_tokens" in str(w.message) for w in caught)


def test_ppo_tiny_function_reward_tip_works_as_written(tmp_path, sft_policy):  # noqa: F811
    """configs/ppo_tiny.yaml's comment shows how to swap in a Python function; run exactly that line."""
    from conftest import REPO

    from rlhf import config

    tip = next(line for line in (REPO / "configs" / "ppo_tiny.yaml").read_text().splitlines()
               if line.startswith("#   rlhf ppo ") and "--reward.spec" in line)
    args = tip.removeprefix("#   rlhf ppo ").split()
    args[args.index("--config") + 1] = str(REPO / "configs" / "ppo_tiny.yaml")
    cfg = config.parse(ppo.PPOConfig, args + ["--model.name_or_path", sft_policy, "--output_dir", str(tmp_path),
                                              "--ppo.steps", "2", "--ppo.per_device_rollout_batch_size", "16"],
                       "rlhf ppo")
    h = ppo.main(cfg)
    assert len(h) == 2 and all(0.0 <= m["objective/scores"] <= 1.0 for m in h)  # exact_answer: 0 or 1 each
    assert (tmp_path / "policy" / "adapter_config.json").exists()


def test_eval_samples_with_the_runs_options_and_runs_no_critic(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    """Regressions: `ppo.stop_token: null` reached the held-out truncation (it raised), the evaluation
    sampled at top_p 1.0 whatever ppo.top_p, and it ran the critic for values it threw away."""
    from policies.actor_critic import ActorCritic
    from rlhf.evaluation.heldout import HeldOutEval

    calls = {"values": 0, "values_in_eval": 0}
    real_values, real_call = ActorCritic.values, HeldOutEval.__call__

    def values(self, *args, **kw):
        calls["values"] += 1
        return real_values(self, *args, **kw)

    def evaluate(self, *args, **kw):
        before = calls["values"]
        out = real_call(self, *args, **kw)
        calls["values_in_eval"] += calls["values"] - before
        return out

    monkeypatch.setattr(ActorCritic, "values", values)
    monkeypatch.setattr(HeldOutEval, "__call__", evaluate)
    # top_p 1e-6: the nucleus is the most likely token alone, so sampled answers are the greedy ones
    cfg = ppo_config(tmp_path, sft_policy, "--ppo.steps", "1", "--ppo.stop_token", "None", "--ppo.top_p", "1e-6",
                     "--ppo.max_new_tokens", "6",
                     *eval_args(tmp_path, "1", "--eval.reward.spec", "tests/rewards.py:digit_fraction"))
    h = ppo.main(cfg, reward=DigitReward())
    evals = [m for m in h if "eval/reward" in m]
    assert [m["step"] for m in evals] == [0, 1]
    assert all(m["eval/length"] == 6 and m["eval/greedy/length"] == 6 for m in evals)  # no stop token: to the end
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "eval_samples.jsonl").read_text().splitlines()]
    for step in (0, 1):
        sampled = [r["response"] for r in samples if r["step"] == step and r["mode"] == "sampled"]
        greedy = [r["response"] for r in samples if r["step"] == step and r["mode"] == "greedy"]
        assert len(sampled) == 10 and sampled == greedy
    assert calls["values"] > 0 and calls["values_in_eval"] == 0  # the training ran the critic, the evaluation not
    assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # its KL pass still ran: policy == reference
