"""The critic-free estimators of rlhf/ppo/core.py (RLOO, GRPO, REINFORCE++) against Python-loop
references written here, on hand-built groups: ties, single-sample groups refused, masking."""

import statistics

import pytest
import torch
from torch.testing import assert_close

from rlhf.ppo.core import gae, grpo_advantages, returns_to_go, rloo_advantages

F64 = torch.float64


def rloo_reference(rewards: list[float], k: int) -> list[float]:
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return out


def grpo_reference(rewards: list[float], k: int, scale: bool, eps: float = 1e-6) -> list[float]:
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        mean, std = statistics.mean(group), statistics.stdev(group)  # sample std, as the paper's code
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def returns_reference(rewards: list[list[float]], lengths: list[int], gamma: float) -> list[list[float]]:
    out = []
    for row, n in zip(rewards, lengths):
        g = [0.0] * len(row)
        for t in range(n):
            g[t] = sum(gamma ** (s - t) * row[s] for s in range(t, n))
        out.append(g)
    return out


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_matches_loop_reference(k):
    rewards = torch.randn(6 * k, generator=torch.Generator().manual_seed(k), dtype=F64)
    assert_close(rloo_advantages(rewards, k), torch.tensor(rloo_reference(rewards.tolist(), k), dtype=F64))


def test_rloo_hand_built_groups_and_ties():
    # group 1: 1, 2, 3 -> 1 - 2.5, 2 - 2, 3 - 1.5; group 2: a tie -> 0 everywhere
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=F64), 3)
    assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0], dtype=F64))
    # each group's advantages sum to 0, and equal k / (k - 1) x (r - group mean)
    r = torch.tensor([0.3, -1.0, 2.0, 0.7], dtype=F64)
    assert_close(rloo_advantages(r, 4), 4 / 3 * (r - r.mean()))


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("k", [2, 4])
def test_grpo_matches_loop_reference(k, scale):
    rewards = torch.randn(5 * k, generator=torch.Generator().manual_seed(10 + k), dtype=F64)
    assert_close(grpo_advantages(rewards, k, scale_by_std=scale),
                 torch.tensor(grpo_reference(rewards.tolist(), k, scale), dtype=F64))


def test_grpo_hand_built_groups_and_ties():
    adv = grpo_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=F64), 2)
    # group (0, 1): mean 0.5, sample std sqrt(0.5); ties: 0, not NaN
    s = 0.5 ** 0.5
    assert_close(adv, torch.tensor([-0.5 / (s + 1e-6), 0.5 / (s + 1e-6), 0, 0, 0, 0], dtype=F64))
    # the std switch: unscaled advantages keep the reward scale, scaled ones do not depend on it
    r = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64)
    assert_close(grpo_advantages(10 * r, 4, scale_by_std=False), 10 * grpo_advantages(r, 4, scale_by_std=False))
    assert_close(grpo_advantages(10 * r, 4), grpo_advantages(r, 4), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_estimators_refuse_single_sample_groups_and_ragged_batches(fn):
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        fn(torch.ones(5), 2)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        fn(torch.ones(4, 2), 2)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_to_go_matches_loop_reference_with_padding(gamma):
    lengths = [5, 3, 1, 0]
    rewards = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    garbage = rewards.masked_fill(~mask, 1e9)  # padding must not leak into the returns
    expected = torch.tensor(returns_reference(rewards.tolist(), lengths, gamma), dtype=F64)
    assert_close(returns_to_go(garbage, mask, gamma), expected)
    # REINFORCE++'s returns are GAE with a zero critic and lambda 1
    adv, _ = gae(rewards.masked_fill(~mask, 0), torch.zeros_like(rewards), mask, gamma, 1.0)
    assert_close(returns_to_go(rewards, mask, gamma), adv)
