"""The critic-free estimators in our trainer (`ppo.advantage_estimator`): they build no critic, each
raises the reward on a tiny function-reward task, GRPO's KL-in-the-loss holds the policy near the
reference, and misconfigurations are refused. (Math: tests/test_estimators_core.py; resume and
2-process runs: test_ppo_resume.py, test_ppo_distributed.py.)"""

import re

import pytest
import torch
from rewards import DigitReward
from safetensors.torch import load_file
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

from rlhf import config, ppo
from rlhf.errors import UserError
from rlhf.ppo import config as ppo_cfg
from rlhf.ppo import models, rollout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CRITIC_FREE = ["rloo", "grpo", "reinforce_pp"]


def estimator_config(tmp_path, policy, estimator, *args):
    return ppo_config(tmp_path, policy, "--ppo.advantage_estimator", estimator, "--ppo.samples_per_prompt", "4", *args)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_critic_free_run_builds_no_critic(tmp_path, sft_policy, method):  # noqa: F811
    from accelerate import PartialState

    PartialState()
    gae_cfg = ppo_config(tmp_path / "gae", sft_policy, "--peft.method", method, "--ppo.steps", "1")
    grpo_cfg = estimator_config(tmp_path / "grpo", sft_policy, "grpo", "--peft.method", method, "--ppo.steps", "1",
                                "--save_steps", "1")
    _, with_critic, _ = models.build_models(gae_cfg, True)
    _, critic_free, _ = models.build_models(grpo_cfg, True)
    names = [n for n, _ in critic_free.named_parameters()]
    assert not critic_free.has_critic and critic_free.value_head is None and critic_free.critic is None
    assert not [n for n in names if "critic" in n or "value_head" in n]
    assert [n for n, _ in with_critic.named_parameters() if "critic" in n or "value_head" in n]
    assert critic_free.parameter_groups()["critic"] == []
    # the run: no value loss or value metrics, a smaller model in memory, no critic exported
    h_gae = ppo.main(gae_cfg, reward=DigitReward())
    h = ppo.main(grpo_cfg, reward=DigitReward())
    assert not [k for k in h[0] if k.startswith("val/") or k in ("loss/value", "lr_critic")]
    assert "loss/value" in h_gae[0] and "val/explained_variance" in h_gae[0]
    assert h[0]["memory/model_gb"] < h_gae[0]["memory/model_gb"]
    # what the critic-free run saves is exactly the critic: its model or adapter, and the value head
    tensors = list(with_critic.named_parameters()) + list(with_critic.named_buffers())
    critic_bytes = sum(q.numel() * q.element_size() for n, q in tensors
                       if n.startswith(("critic.", "value_head.")) or ".critic." in n)
    saved = h_gae[0]["memory/model_gb"] - h[0]["memory/model_gb"]
    assert saved == pytest.approx(critic_bytes / 1e9, rel=1e-6)
    out = tmp_path / "grpo" / "ppo"
    assert (out / "policy").is_dir() and not (out / "critic").exists()
    assert not [k for k in load_file(out / "checkpoint-1" / "model.safetensors") if "critic" in k or "value_head" in k]


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_each_estimator_raises_the_reward(tmp_path, sft_policy, estimator):  # noqa: F811
    cfg = estimator_config(tmp_path, sft_policy, estimator, "--ppo.steps", "30",
                           "--ppo.per_device_rollout_batch_size", "32", "--ppo.kl_coef", "0.05")
    h = ppo.main(cfg, reward=DigitReward())
    first = sum(m["objective/scores"] for m in h[:5]) / 5
    last = sum(m["objective/scores"] for m in h[-5:]) / 5
    assert last > first + 0.2, (estimator, first, last)  # measured: 0.21-0.27 -> 0.73-0.79
    assert sum(m["objective/kl"] for m in h[-5:]) / 5 < 6.0  # measured 3.9-4.4 at the end


def test_group_advantages_credit_every_token_of_a_response():
    p = ppo.PPOHyperparameters(advantage_estimator="rloo", samples_per_prompt=2)
    rewards = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool()
    adv, returns = rollout.advantages(rewards, None, mask, p)
    # sequence rewards 1, 3 | 2, 2: RLOO advantages -2, 2 | 0, 0 on every real token, 0 on padding
    expected = torch.tensor([[-2.0, -2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert returns is None and torch.equal(adv, expected)
    p.advantage_estimator = "reinforce_pp"
    adv, _ = rollout.advantages(rewards, None, mask, p)  # returns to go, whitened over the batch's real tokens
    assert adv[mask].mean().abs() < 1e-6 and (adv[~mask] == 0).all()


def test_kl_in_the_loss_holds_the_policy_near_the_reference(tmp_path, sft_policy):  # noqa: F811
    def run(name, coef):
        cfg = estimator_config(tmp_path / name, sft_policy, "grpo", "--ppo.steps", "8", "--ppo.kl_penalty", "loss",
                               "--ppo.kl_estimator", "k3", "--ppo.kl_coef", coef)
        return ppo.main(cfg, reward=DigitReward())

    free, held = run("free", "0"), run("held", "1.0")
    assert all("loss/kl" in m for m in held)
    # the reward carries no KL penalty: the normalised score is the whole per-sequence reward
    assert held[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    # ... so the metrics say so: no non-score reward, the RLHF reward is the score, though the policy moved
    assert all(m["objective/non_score_reward"] == 0 for m in held)
    assert all(m["objective/rlhf_reward"] == m["objective/scores_normalized"] for m in held)
    assert max(m["objective/kl"] for m in held) > 0.01
    kl_free = sum(m["objective/kl"] for m in free[-4:]) / 4
    kl_held = sum(m["objective/kl"] for m in held[-4:]) / 4
    assert kl_held < 0.7 * kl_free, (kl_held, kl_free)


@pytest.mark.parametrize("args, message", [
    (["--ppo.advantage_estimator", "grpo"], "ppo.advantage_estimator=grpo compares the responses to the same "
                                            "prompt: set ppo.samples_per_prompt to at least 2 (got 1)"),
    (["--ppo.advantage_estimator", "rloo", "--ppo.samples_per_prompt", "2", "--ppo.critic_init", "reward"],
     "ppo.critic_init=reward: ppo.advantage_estimator=rloo builds no critic"),
    (["--ppo.kl_penalty", "loss"], "ppo.kl_penalty=loss needs ppo.kl_estimator k3 (GRPO's) or k2"),
    (["--ppo.advantage_estimator", "ppo"], "ppo.advantage_estimator"),
])
def test_estimator_misconfigurations_are_refused(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ppo_cfg.check(config.parse(ppo.PPOConfig, args, "t"))


@pytest.mark.parametrize("args", [
    ["--eval.prompts", "builtin:quickstart_eval_prompts", "--eval.reward.spec", "reward.examples:exact_answer",
     "--eval.max_prompts", "16"],  # the held-out evaluation's own logprob pass (it crashed on a critic-free model)
    ["--ppo.logprobs_from_generation", "true"],  # no policy pass in the rollout, and no critic either
])
def test_critic_free_runs_with_held_out_eval_and_logprobs_from_generation(tmp_path, sft_policy, args):  # noqa: F811
    h = ppo.main(estimator_config(tmp_path, sft_policy, "grpo", "--ppo.steps", "2", *args), reward=DigitReward())
    train = [m for m in h if "objective/scores" in m]
    assert len(train) == 2 and all(m["objective/kl"] > -0.01 for m in train)
    if "--eval.prompts" in args:
        assert [m["step"] for m in h if "eval/reward" in m] == [0, 2] and 0 <= h[-1]["eval/reward"] <= 1
