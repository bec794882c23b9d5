"""`rlhf eval policy`: self-consistency (a policy against itself) and a PPO-trained policy winning."""

import json

import pytest

from conftest import REPO
from rewards import DigitReward
from rlhf import cli, config, eval_policy, ppo
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

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
