"""Credit over multi-turn episodes (rlhf/envs/credit.py) against slow loops over the agent's tokens, on
hand-built action masks: two agent turns with environment tokens between them, padding, no actions."""

import pytest
import torch

from rlhf.envs import credit
from rlhf.ppo import core

# 3 episodes, T = 9: P prompt, A agent, E environment, . padding
#   0: P P A A A E E A A      two turns (ends at 4 and 8)
#   1: P A E A E A . . .      three one-token turns (ends at 1, 3, 5)
#   2: P P P . . . . . .      no action (cut before the agent spoke)
ACTIONS = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1],
                        [0, 1, 0, 1, 0, 1, 0, 0, 0],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
ENDS = [[4, 8], [1, 3, 5], []]


def agent_positions(mask_row) -> list[int]:
    return [t for t, a in enumerate(mask_row.tolist()) if a]


def loop_gae(rewards, values, mask, gamma, lam):
    """The definition: walk the agent's tokens only, last to first; the next step is the next agent token."""
    adv, ret = torch.zeros_like(values), torch.zeros_like(values)
    for b in range(values.shape[0]):
        pos = agent_positions(mask[b])
        next_value = next_adv = 0.0
        for t in reversed(pos):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t].item()
    return adv, ret


def loop_returns_to_go(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(agent_positions(mask[b])):
            running = rewards[b, t].item() + gamma * running
            out[b, t] = running
    return out


def test_turn_ends_and_last_action():
    ends = credit.turn_ends(ACTIONS)
    assert [row.nonzero().flatten().tolist() for row in ends] == ENDS
    assert credit.last_action_index(ACTIONS).tolist() == [8, 5, -1]


def test_token_rewards_place_turn_rewards_kl_and_the_episode_score():
    g = torch.Generator().manual_seed(0)
    kl = torch.randn(3, 9, generator=g)
    turn_rewards = torch.zeros(3, 9)
    turn_rewards[0, 4], turn_rewards[0, 8], turn_rewards[1, 3] = 0.5, 1.0, -2.0
    scores = torch.tensor([3.0, 4.0, 5.0])
    got = credit.token_rewards(turn_rewards, scores, kl, ACTIONS, kl_coef=0.1)
    want = torch.zeros(3, 9)
    for b in range(3):
        pos = agent_positions(ACTIONS[b])
        for t in pos:
            want[b, t] = -0.1 * kl[b, t] + turn_rewards[b, t]
        if pos:
            want[b, pos[-1]] += scores[b]
    assert torch.allclose(got, want)
    assert (got[~ACTIONS] == 0).all()  # environment tokens: no KL penalty, no reward; row 2 gets no score


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0)])
def test_agent_gae_skips_environment_tokens(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    adv, ret = core.gae(rewards, values, ACTIONS, gamma, lam)
    want_adv, want_ret = loop_gae(rewards, values, ACTIONS, gamma, lam)
    assert torch.allclose(adv, want_adv, atol=1e-6) and torch.allclose(ret, want_ret, atol=1e-6)
    assert (adv[~ACTIONS] == 0).all() and (ret[~ACTIONS] == 0).all()
    # the value after token 4 of episode 0 is that of token 7 (the next agent token), not of token 5
    assert torch.isclose(adv[0, 4], rewards[0, 4] + gamma * values[0, 7] - values[0, 4] + gamma * lam * adv[0, 7])


def test_environment_tokens_change_nothing_but_the_layout():
    """Removing the environment's tokens (compacting the agent's) gives the same advantages: they are
    context, not steps."""
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    adv, _ = core.gae(rewards, values, ACTIONS, 0.9, 0.8)
    for b in range(2):
        pos = agent_positions(ACTIONS[b])
        compact_adv, _ = core.gae(rewards[b:b + 1, pos], values[b:b + 1, pos], torch.ones(1, len(pos)), 0.9, 0.8)
        assert torch.allclose(adv[b, pos], compact_adv[0], atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_all_actions_equals_single_turn_gae(gamma, lam):
    """With every token an action (one turn, no environment tokens) it is the single-turn GAE of PPO,
    here against its loop too, so the two cannot agree by sharing a bug."""
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    ones = torch.ones(4, 7, dtype=torch.bool)
    adv, ret = core.gae(rewards, values, ones, gamma, lam)
    single_adv, single_ret = core.gae(rewards, values, ones, gamma, lam)
    assert torch.allclose(adv, single_adv) and torch.allclose(ret, single_ret)
    assert torch.allclose(adv, loop_gae(rewards, values, ones, gamma, lam)[0], atol=1e-6)


def test_trajectory_returns_and_returns_to_go():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 9, generator=g)
    total = core.sequence_returns(rewards, ACTIONS)
    want = torch.tensor([sum(rewards[b, t].item() for t in agent_positions(ACTIONS[b])) for b in range(3)])
    assert torch.allclose(total, want) and total[2] == 0
    rtg = core.returns_to_go(rewards, ACTIONS, gamma=0.9)
    assert torch.allclose(rtg, loop_returns_to_go(rewards, ACTIONS, 0.9), atol=1e-6)
    first = [agent_positions(ACTIONS[b])[0] for b in range(2)]
    assert torch.allclose(core.returns_to_go(rewards, ACTIONS)[[0, 1], first], total[:2])  # gamma 1: the whole return


def test_spread_puts_the_episode_advantage_on_its_agent_tokens():
    adv = core.spread(torch.tensor([1.5, -2.0, 7.0]), ACTIONS)
    assert adv.shape == (3, 9)
    assert (adv[0][ACTIONS[0]] == 1.5).all() and (adv[1][ACTIONS[1]] == -2.0).all()
    assert (adv[~ACTIONS] == 0).all()  # environment, prompt, padding; and row 2 has no action at all
    # GRPO over a group of the two episodes' trajectory returns, spread to their tokens
    rewards = torch.zeros(3, 9)
    rewards[0, 8], rewards[1, 5] = 1.0, 0.0
    grpo = core.grpo_advantages(core.sequence_returns(rewards, ACTIONS)[:2], group_size=2)
    spread = core.spread(grpo, ACTIONS[:2])
    assert spread[0, 2] > 0 > spread[1, 1] and spread[0, 5] == 0
