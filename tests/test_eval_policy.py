"""`rlhf eval policy`: self-consistency (a policy against itself), several samples per prompt, the
truncation rate, and a PPO-trained policy winning."""

import json
import os

import pytest
from conftest import REPO
from agent_envs import Countdown
from rewards import DigitReward
from test_generate import COUNTDOWN, ENV_LIMITS, countdown_rows, read, replay_episode
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


@pytest.fixture(scope="module")
def nudged_policy(sft_policy, tmp_path_factory):  # noqa: F811
    """The SFT model with every weight nudged: another policy on the same tokenizer, close to it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("nudged")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(sft_policy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft_policy).save_pretrained(out)
    return str(out)


def test_episodes_of_both_models_and_their_metrics(tmp_path, sft_policy, nudged_policy):  # noqa: F811
    """`rlhf eval policy --env.spec`, in a subprocess, greedy: both models' episodes are written whole and
    replay exactly (the same episode seeds for both), and every reported metric is what the written
    episodes give: outcome means, the paired win rate on returns, the KL over the policy's agent tokens."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "e.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "eval", "policy", "--policy", nudged_policy, "--reference",
                        sft_policy, "--env.spec", COUNTDOWN, "--prompts.train", countdown_rows(tmp_path / "rows.jsonl"),
                        "--samples_per_prompt", "2", "--temperature", "0", *ENV_LIMITS, "--output", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    episodes = read(tmp_path / "e.episodes.jsonl")
    by_model = {m: [e for e in episodes if e["model"] == m] for m in ("policy", "reference")}
    assert [e["model"] for e in episodes] == ["policy"] * 8 + ["reference"] * 8
    assert [e["seed"] for e in by_model["policy"]] == [e["seed"] for e in by_model["reference"]]
    assert [e["ids"] for e in by_model["policy"]] != [e["ids"] for e in by_model["reference"]]  # they differ
    tok = AutoTokenizer.from_pretrained(sft_policy)
    actions = {m: [replay_episode(e, tok, Countdown(), 4, 64) for e in by_model[m]] for m in by_model}
    assert (r["n_rows"], r["samples_per_prompt"], r["n_episodes"]) == (4, 2, 8)
    for m, eps in by_model.items():
        for key in ("success", "return", "turns", "tool_calls", "tokens", "truncated"):
            assert r[f"{key}_{m}"] == pytest.approx(sum(float(e[key]) for e in eps) / 8), (m, key)
    pairs = zip(by_model["policy"], by_model["reference"])
    assert r["win_rate"] == pytest.approx(sum((a["return"] > b["return"]) + 0.5 * (a["return"] == b["return"])
                                              for a, b in pairs) / 8)
    models = {path: AutoModelForCausalLM.from_pretrained(path) for path in (nudged_policy, sft_policy)}

    def logprob(path, e, positions):  # of the sampled ids at `positions`, summed
        with torch.no_grad():
            logits = models[path](input_ids=torch.tensor([e["ids"]])).logits[0]  # (T, V)
        at = torch.tensor(positions)
        return torch.log_softmax(logits[at - 1], -1).gather(-1, torch.tensor(e["ids"])[at, None]).sum().item()

    kl = [logprob(nudged_policy, e, a) - logprob(sft_policy, e, a) for e, a in zip(by_model["policy"], actions["policy"])]
    assert r["kl_policy_reference"] == pytest.approx(sum(kl) / 8, abs=1e-4) and abs(r["kl_policy_reference"]) > 1e-3
    assert f"**Success rate of the policy: {r['success_policy']:.3f}**" in p.stdout
    assert (tmp_path / "e.md").read_text().startswith("# Policy evaluation")


def test_env_spec_that_does_not_load_is_one_line(tmp_path, sft_policy, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(REPO)
    code = cli.main(["eval", "policy", "--policy", sft_policy, "--reference", sft_policy, "--env.spec",
                     "tests/agent_envs.py:Nope", "--prompts.train", "builtin:calc_eval", "--output",
                     str(tmp_path / "o" / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'Nope' does not exist" in err[0], err
    assert not (tmp_path / "o").exists()
