"""`rlhf eval policy`: self-consistency (a policy against itself), several samples per prompt, the
truncation rate, and a PPO-trained policy winning."""

import json

import pytest
from conftest import REPO
from rewards import DigitReward
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

from rlhf import cli, config, ppo
from rlhf.evaluation import eval_policy
from rlhf.generation.prompts import load_prompts


class RecordingReward(DigitReward):
    """DigitReward that keeps every (prompt, response) it scores."""

    def __init__(self):
        self.prompts, self.responses = [], []

    def score(self, prompts, responses, normalize=False):
        self.prompts += prompts
        self.responses += responses
        return super().score(prompts, responses)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_policy_against_itself(tmp_path, sft_policy, capsys):  # noqa: F811
    code = cli.main(["eval", "policy", "--policy", sft_policy, "--reference", sft_policy,
                     "--reward.spec", str(REPO / "tests" / "rewards.py") + ":digit_fraction",
                     "--prompts.max_samples", "24", "--max_new_tokens", "8", "--output", str(tmp_path / "e.json")])
    assert code == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["n_prompts"] == 24
    assert r["win_rate"] == 0.5  # same model, same seed: every pair is a tie
    assert r["kl_policy_reference"] == pytest.approx(0.0, abs=1e-5)
    assert r["reward_policy"] == r["reward_reference"]
    assert (tmp_path / "e.md").read_text().startswith("# Policy evaluation")
    assert "Win rate of the policy: 0.500" in capsys.readouterr().out


def test_samples_per_prompt(tmp_path, sft_policy):  # noqa: F811
    reward = RecordingReward()
    cfg = config.parse(eval_policy.EvalPolicyConfig, [
        "--policy", sft_policy, "--reference", sft_policy, "--prompts.max_samples", "10", "--samples_per_prompt", "3",
        "--max_new_tokens", "8", "--temperature", "1.0", "--output", str(tmp_path / "e.json")], "t")
    r = eval_policy.main(cfg, reward=reward)
    assert (r["n_prompts"], r["samples_per_prompt"], r["n_samples"]) == (10, 3, 30)
    assert len(reward.responses) == 2 * 30  # policy's and reference's samples, each scored once
    prompts = load_prompts(cfg.prompts)
    assert reward.prompts[:30] == reward.prompts[30:] == [p for p in prompts for _ in range(3)]
    assert any(len(set(reward.responses[i:i + 3])) > 1 for i in range(0, 30, 3))  # K samples, not K copies
    assert r["win_rate"] == 0.5  # still the same model and seed: every pair is a tie
    assert r["kl_policy_reference"] == pytest.approx(0.0, abs=1e-5)
    assert r["reward_policy"] == pytest.approx(sum(DigitReward().score(None, reward.responses[:30]).tolist()) / 30)
    assert len({s["prompt"] for s in r["samples"]}) == len(r["samples"])  # the table shows distinct prompts


def test_truncated_rate_and_warning(tmp_path, sft_policy, capsys):  # noqa: F811
    cfg = config.parse(eval_policy.EvalPolicyConfig, [
        "--policy", sft_policy, "--reference", sft_policy, "--prompts.max_samples", "12", "--max_new_tokens", "2",
        "--output", str(tmp_path / "e.json")], "t")
    assert eval_policy.EvalPolicyConfig().max_new_tokens == 64
    r = eval_policy.main(cfg, reward=DigitReward())
    # With 2 new tokens, a response without EOS ran into the limit: truncated == 1 - EOS rate.
    assert r["truncated_rate_policy"] == pytest.approx(1 - r["eos_rate_policy"])
    assert r["truncated_rate_policy"] > 0.2
    out = capsys.readouterr().out
    assert "of the policy's responses hit --max_new_tokens 2 without EOS; raise --max_new_tokens" in out


def test_ppo_policy_beats_its_reference(tmp_path, sft_policy):  # noqa: F811
    ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.steps", "25", "--ppo.per_device_rollout_batch_size", "32",
                        "--ppo.kl_coef", "0.02"), reward=DigitReward())
    cfg = config.parse(eval_policy.EvalPolicyConfig, [
        "--policy", str(tmp_path / "ppo" / "policy"), "--reference", sft_policy, "--prompts.max_samples", "64",
        "--max_new_tokens", "8", "--temperature", "1.0", "--output", str(tmp_path / "e.json")], "t")
    r = eval_policy.main(cfg, reward=DigitReward())
    assert r["reward_policy"] > r["reward_reference"]
    assert r["win_rate"] > 0.55
    assert r["kl_policy_reference"] > 0.05  # it moved away from the reference


def test_stop_token_and_device(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    """Regressions: `rlhf eval policy` stopped at EOS whatever the stop token, and never moved its models
    to the GPU (the device is the one `default_device` chooses; tests/test_generation.py checks that it
    is the GPU when there is one)."""
    import torch

    chosen, moved = [], []
    real_to = torch.nn.Module.to

    def to(self, *args, **kw):
        moved.append(args[0] if args else kw.get("device"))
        return real_to(self, *args, **kw)

    monkeypatch.setattr(eval_policy, "default_device", lambda: chosen.append(torch.device("cpu")) or chosen[-1])
    monkeypatch.setattr(torch.nn.Module, "to", to)
    cfg = config.parse(eval_policy.EvalPolicyConfig, [
        "--policy", sft_policy, "--reference", sft_policy, "--prompts.max_samples", "8", "--max_new_tokens", "6",
        "--temperature", "0", "--stop_token", "None", "--output", str(tmp_path / "e.json")], "t")
    r = eval_policy.main(cfg, reward=DigitReward())
    assert len(chosen) == 1 and moved.count(chosen[0]) >= 2  # the policy and the reference
    assert r["length_policy"] == r["length_reference"] == 6  # no stop token: every answer runs to the end
    assert r["truncated_rate_policy"] == 0.0
