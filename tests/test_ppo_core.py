"""Tests for rlhf/ppo/core.py: each function against a slow Python-loop reference written here.

The references are deliberately naive (element by element, plain floats) so they are easy to
check by eye; the hand-built tensors cover the edge cases that matter for RLHF (no stop token,
stop token first, all-padding rows, clipping on and off).
"""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from rlhf.ppo import core as ppo_core
from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    first_true_indices,
    gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    missing_eos_penalty,
    per_token_rewards,
    policy_loss,
    truncate_after_stop_token,
    value_loss,
)

F64 = torch.float64


def prefix_mask(lengths: list[int], num_actions: int) -> torch.Tensor:
    """(B, A) bool mask with `lengths[b]` leading Trues in row b, built by a loop."""
    mask = torch.zeros(len(lengths), num_actions, dtype=torch.bool)
    for b, length in enumerate(lengths):
        for t in range(length):
            mask[b, t] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Loop references
# ---------------------------------------------------------------------------------------------


def ref_masked_values(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def ref_masked_mean(x, mask):
    values = ref_masked_values(x, mask)
    return sum(values) / len(values) if values else 0.0


def ref_masked_var(x, mask, unbiased=True):
    values = ref_masked_values(x, mask)
    n = len(values)
    if n == 0:
        return 0.0
    mean = sum(values) / n
    squares = sum((v - mean) ** 2 for v in values)
    if unbiased:
        return squares / (n - 1) if n > 1 else 0.0
    return squares / n


def ref_logprob(logits_row: list[float], token: int) -> float:
    total = sum(math.exp(z) for z in logits_row)
    return logits_row[token] - math.log(total)


def ref_entropy(logits_row: list[float]) -> float:
    total = sum(math.exp(z) for z in logits_row)
    probs = [math.exp(z) / total for z in logits_row]
    return -sum(p * math.log(p) for p in probs)


def ref_truncate(responses, stop, pad):
    out, mask = [], []
    for row in responses.tolist():
        new_row, mask_row, stopped = [], [], False
        for token in row:
            if stopped:
                new_row.append(pad)
                mask_row.append(False)
            else:
                new_row.append(token)
                mask_row.append(True)
                stopped = token == stop
        out.append(new_row)
        mask.append(mask_row)
    return torch.tensor(out), torch.tensor(mask)


def ref_gae(rewards, values, mask, gamma, lam):
    """Per row: keep only the real tokens, run textbook GAE on that short episode, scatter back."""
    advantages = torch.zeros_like(values)
    returns = torch.zeros_like(values)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [0.0]  # the episode ends: V after the end is 0
        adv = [0.0] * len(steps)
        running = 0.0
        for i in reversed(range(len(steps))):
            delta = r[i] + gamma * v[i + 1] - v[i]
            running = delta + gamma * lam * running
            adv[i] = running
        for i, t in enumerate(steps):
            advantages[b, t] = adv[i]
            returns[b, t] = adv[i] + v[i]
    return advantages, returns


def ref_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    losses, clipped_flags, sq_log_ratios, ratios = [], [], [], []
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            log_ratio = float(logprobs[b, t] - old_logprobs[b, t])
            ratio = math.exp(log_ratio)
            adv = float(advantages[b, t])
            clipped_ratio = min(max(ratio, 1 - cliprange), 1 + cliprange)
            unclipped_loss, clipped_loss = -adv * ratio, -adv * clipped_ratio
            losses.append(max(unclipped_loss, clipped_loss))
            clipped_flags.append(1.0 if clipped_loss > unclipped_loss else 0.0)
            sq_log_ratios.append(log_ratio**2)
            ratios.append(ratio)
    n = len(losses)
    return sum(losses) / n, {
        "clipfrac": sum(clipped_flags) / n,
        "approx_kl": 0.5 * sum(sq_log_ratios) / n,
        "ratio_mean": sum(ratios) / n,
    }


def ref_value_loss(values, old_values, returns, mask, cliprange_value):
    losses, clipped_flags = [], []
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[b, t]:
                continue
            v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            unclipped = (v - ret) ** 2
            if cliprange_value is None:
                losses.append(unclipped)
                clipped_flags.append(0.0)
                continue
            v_clipped = min(max(v, v_old - cliprange_value), v_old + cliprange_value)
            clipped = (v_clipped - ret) ** 2
            losses.append(max(unclipped, clipped))
            clipped_flags.append(1.0 if clipped > unclipped else 0.0)
    n = len(losses)
    return 0.5 * sum(losses) / n, {"clipfrac": sum(clipped_flags) / n}


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def test_masked_mean_matches_loop_reference_all_and_per_dim():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=F64)
    mask = torch.rand(4, 7) > 0.4
    mask[2] = False  # an all-padding row
    assert_close(masked_mean(x, mask), scalar(ref_masked_mean(x, mask)))
    per_row = masked_mean(x, mask, dim=1)  # (B,)
    expected = torch.tensor([ref_masked_mean(x[b], mask[b]) for b in range(4)], dtype=F64)
    assert_close(per_row, expected)
    assert per_row[2] == 0  # empty row: 0, not NaN
    per_col = masked_mean(x, mask, dim=0)  # (A,)
    expected = torch.tensor([ref_masked_mean(x[:, t], mask[:, t]) for t in range(7)], dtype=F64)
    assert_close(per_col, expected)


def test_masked_mean_ignores_garbage_under_mask_and_accepts_float_mask():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), -float("inf")]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    assert_close(masked_mean(x, mask), scalar(2.0))
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0], dtype=F64))


def test_masked_mean_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop_reference(unbiased):
    torch.manual_seed(1)
    x = torch.randn(5, 6, dtype=F64) * 3 + 1
    mask = torch.rand(5, 6) > 0.5
    x[~mask] = 1e6  # padding values must not leak into the statistic
    assert_close(masked_var(x, mask, unbiased=unbiased), scalar(ref_masked_var(x, mask, unbiased)))


def test_masked_var_degenerate_counts_are_zero_not_nan():
    x = torch.tensor([[4.0, 5.0]], dtype=F64)
    assert_close(masked_var(x, torch.tensor([[True, False]])), scalar(0.0))
    assert_close(masked_var(x, torch.tensor([[False, False]])), scalar(0.0))


def test_masked_whiten_equals_whitening_the_unmasked_values_by_hand():
    torch.manual_seed(2)
    x = torch.randn(3, 5, dtype=F64) * 4 + 2
    mask = prefix_mask([5, 2, 3], 5)
    x[~mask] = float("nan")  # padding must not matter at all
    kept = x[mask]  # the real values, computed on directly below
    by_hand = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)

    whitened = masked_whiten(x, mask)
    assert_close(whitened[mask], by_hand)
    assert torch.all(whitened[~mask] == 0)
    assert_close(whitened[mask].mean(), scalar(0.0))
    assert_close(whitened[mask].std(), scalar(1.0))

    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert_close(kept_mean[mask], by_hand + kept.mean())
    assert torch.all(kept_mean[~mask] == 0)


def test_masked_whiten_all_masked_is_finite():
    out = masked_whiten(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(out == 0)


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------


def test_logprobs_from_logits_matches_loop_reference():
    torch.manual_seed(3)
    B, A, V = 3, 4, 11
    logits = torch.randn(B, A, V, dtype=F64) * 5
    tokens = torch.randint(0, V, (B, A))
    got = logprobs_from_logits(logits, tokens)  # (B, A)
    expected = torch.tensor(
        [[ref_logprob(logits[b, t].tolist(), int(tokens[b, t])) for t in range(A)] for b in range(B)],
        dtype=F64,
    )
    assert got.shape == (B, A)
    assert_close(got, expected)


def test_logprobs_from_logits_gradient_matches_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 7, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    weights = torch.randn(2, 3, dtype=F64)
    (logprobs_from_logits(logits, tokens) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    direct = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (direct * weights).sum().backward()
    assert_close(ours, logits.grad)


def test_logprobs_from_bf16_logits_are_float32_and_accurate():
    torch.manual_seed(5)
    logits = (torch.randn(2, 3, 50) * 8).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 3))
    got = logprobs_from_logits(logits, tokens)
    assert got.dtype == torch.float32
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)


def test_entropy_from_logits_matches_loop_reference_and_bounds():
    torch.manual_seed(6)
    B, A, V = 2, 3, 9
    logits = torch.randn(B, A, V, dtype=F64) * 3
    logits[0, 0] = 0.0  # uniform: entropy log V
    logits[1, 2, 4] = 100.0  # nearly one-hot: entropy ~ 0
    got = entropy_from_logits(logits)
    expected = torch.tensor(
        [[ref_entropy(logits[b, t].tolist()) for t in range(A)] for b in range(B)], dtype=F64
    )
    assert_close(got, expected)
    assert_close(got[0, 0], scalar(math.log(V)))
    assert abs(float(got[1, 2])) < 1e-10


# ---------------------------------------------------------------------------------------------
# Episode boundaries
# ---------------------------------------------------------------------------------------------


def test_first_true_indices_matches_loop_reference():
    bools = torch.tensor(
        [
            [False, False, True, True],
            [True, False, False, False],
            [False, False, False, False],  # none: A
            [False, False, False, True],
        ]
    )
    expected = []
    for row in bools.tolist():
        expected.append(next((i for i, v in enumerate(row) if v), len(row)))
    got = first_true_indices(bools)
    assert got.dtype == torch.long
    assert got.tolist() == expected == [2, 0, 4, 3]


def test_first_true_indices_random_matches_loop_reference():
    torch.manual_seed(7)
    bools = torch.rand(20, 9) > 0.8
    expected = [next((i for i, v in enumerate(row) if v), 9) for row in bools.tolist()]
    assert first_true_indices(bools).tolist() == expected


def test_truncate_after_stop_token_hand_built_rows():
    STOP, PAD = 2, 0
    responses = torch.tensor(
        [
            [5, 6, 2, 7, 2],  # stop in the middle, a second stop after it
            [5, 6, 7, 8, 9],  # no stop token: the whole row is kept
            [2, 6, 7, 8, 9],  # stop token first: a one-action episode
            [5, 6, 7, 8, 2],  # stop token last
        ]
    )
    out, mask = truncate_after_stop_token(responses, stop_token_id=STOP, pad_token_id=PAD)
    assert out.tolist() == [
        [5, 6, 2, 0, 0],
        [5, 6, 7, 8, 9],
        [2, 0, 0, 0, 0],
        [5, 6, 7, 8, 2],
    ]
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 5, 1, 5]
    ref_out, ref_mask = ref_truncate(responses, STOP, PAD)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    assert responses[0, 3] == 7  # input not modified


def test_truncate_after_stop_token_random_matches_loop_reference():
    torch.manual_seed(8)
    responses = torch.randint(1, 6, (16, 10))  # token 1 is the stop token, common enough
    out, mask = truncate_after_stop_token(responses, stop_token_id=1, pad_token_id=0)
    ref_out, ref_mask = ref_truncate(responses, 1, 0)
    assert torch.equal(out, ref_out)
    assert torch.equal(mask, ref_mask)


def test_truncate_after_stop_token_rejects_pad_equal_to_stop():
    with pytest.raises(ValueError, match="must differ"):
        truncate_after_stop_token(torch.tensor([[1, 2]]), stop_token_id=2, pad_token_id=2)


# ---------------------------------------------------------------------------------------------
# KL estimators and rewards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_loop_reference(estimator):
    torch.manual_seed(9)
    logprobs = -torch.rand(3, 4, dtype=F64) * 3
    ref_logprobs = -torch.rand(3, 4, dtype=F64) * 3
    got = kl_estimate(logprobs, ref_logprobs, estimator)
    expected = torch.zeros(3, 4, dtype=F64)
    for b in range(3):
        for t in range(4):
            log_p, log_q = float(logprobs[b, t]), float(ref_logprobs[b, t])
            r = math.exp(log_q - log_p)  # r = q / p, samples from p (the policy)
            expected[b, t] = {
                "k1": log_p - log_q,
                "k2": 0.5 * math.log(r) ** 2,
                "k3": (r - 1) - math.log(r),
            }[estimator]
    assert_close(got, expected)
    assert_close(kl_estimate(logprobs, logprobs, estimator), torch.zeros(3, 4, dtype=F64))


def test_kl_estimators_k1_and_k3_are_unbiased_for_kl_policy_to_reference():
    """Sampling from the policy p, k1 and k3 average to KL(p || q), not KL(q || p): the sign convention."""
    generator = torch.Generator().manual_seed(10)
    p = torch.tensor([0.7, 0.2, 0.05, 0.05], dtype=F64)
    q = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=F64)
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert abs(kl_pq - kl_qp) > 0.08  # the two directions are well apart here
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = p.log()[samples], q.log()[samples]
    for estimator in ["k1", "k3"]:
        estimate = float(kl_estimate(logprobs, ref_logprobs, estimator).mean())
        assert abs(estimate - kl_pq) < 0.02, (estimator, estimate, kl_pq)
    assert torch.all(kl_estimate(logprobs, ref_logprobs, "k3") >= 0)


def test_kl_estimate_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_per_token_rewards_matches_loop_reference():
    torch.manual_seed(11)
    B, A = 5, 6
    lengths = [6, 3, 1, 0, 4]  # full row, short, stop token first, all padding, ...
    mask = prefix_mask(lengths, A)
    kl = torch.randn(B, A, dtype=F64)
    scores = torch.randn(B, dtype=F64)
    kl_coef = 0.05
    got = per_token_rewards(scores, kl, mask, kl_coef)
    expected = torch.zeros(B, A, dtype=F64)
    for b in range(B):
        for t in range(lengths[b]):
            expected[b, t] = -kl_coef * float(kl[b, t])
            if t == lengths[b] - 1:
                expected[b, t] += float(scores[b])
    assert_close(got, expected)
    assert torch.all(got[3] == 0) and torch.isfinite(got).all()


def test_per_token_rewards_hand_built():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]], dtype=F64)
    scores = torch.tensor([10.0, -1.0], dtype=F64)
    got = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(got, torch.tensor([[-0.5, -1.0, 8.5, 0.0], [-3.0, 0.0, 0.0, 0.0]], dtype=F64))


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def test_gae_gamma_lam_one_gives_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.25, 1.0, 7.0]], dtype=F64)  # 7.0 sits on padding: must be ignored
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[6.0, 5.0, 3.0, 0.0]], dtype=F64))
    assert_close(advantages, torch.tensor([[5.5, 4.75, 2.0, 0.0]], dtype=F64))


def test_gae_lam_zero_is_one_step_td_error():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.25, 1.0]], dtype=F64)
    advantages, _ = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.0)
    # delta_t = r_t + gamma * V_{t+1} - V_t, and V after the last token is 0
    assert_close(advantages, torch.tensor([[1 + 0.9 * 0.25 - 0.5, 2 + 0.9 * 1.0 - 0.25, 3 - 1.0]], dtype=F64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)])
def test_gae_random_prefix_masks_match_loop_reference(gamma, lam):
    torch.manual_seed(12)
    B, A = 6, 8
    mask = prefix_mask([8, 5, 1, 0, 3, 7], A)
    rewards = torch.randn(B, A, dtype=F64)
    values = torch.randn(B, A, dtype=F64)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    assert_close(advantages, ref_adv)
    assert_close(returns, ref_ret)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    assert torch.isfinite(advantages).all()


def test_gae_skips_holes_in_the_mask():
    torch.manual_seed(13)
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, True, True]])
    rewards = torch.randn(2, 5, dtype=F64)
    values = torch.randn(2, 5, dtype=F64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.9, 0.8)
    assert_close(advantages, ref_adv)
    assert_close(returns, ref_ret)


def test_gae_padding_values_and_rewards_have_no_effect():
    torch.manual_seed(14)
    mask = prefix_mask([4, 2], 6)
    rewards = torch.randn(2, 6, dtype=F64)
    values = torch.randn(2, 6, dtype=F64)
    noisy_rewards, noisy_values = rewards.clone(), values.clone()
    noisy_rewards[~mask] = 123.0
    noisy_values[~mask] = -456.0
    a1, r1 = gae(rewards, values, mask, 0.99, 0.95)
    a2, r2 = gae(noisy_rewards, noisy_values, mask, 0.99, 0.95)
    assert_close(a1, a2)
    assert_close(r1, r2)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_policy_loss_matches_loop_reference():
    torch.manual_seed(15)
    B, A = 4, 6
    mask = prefix_mask([6, 4, 1, 3], A)
    old_logprobs = -torch.rand(B, A, dtype=F64) * 2
    logprobs = old_logprobs + torch.randn(B, A, dtype=F64) * 0.3
    advantages = torch.randn(B, A, dtype=F64)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    ref_loss, ref_stats = ref_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    assert_close(loss, scalar(ref_loss))
    for key in ["clipfrac", "approx_kl", "ratio_mean"]:
        assert_close(stats[key], scalar(ref_stats[key]))
    assert 0 < float(stats["clipfrac"]) < 1  # noise of 0.3 clips some tokens, not all


def test_policy_loss_identical_logprobs_is_minus_mean_advantage():
    mask = prefix_mask([3, 2], 4)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -3.0, -9.0, -9.0]], dtype=F64)
    advantages = torch.tensor([[1.0, -2.0, 3.0, 100.0], [0.5, 0.5, 100.0, 100.0]], dtype=F64)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    assert_close(loss, scalar(-(1.0 - 2.0 + 3.0 + 0.5 + 0.5) / 5))
    assert float(stats["clipfrac"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0
    assert_close(stats["ratio_mean"], scalar(1.0))


def test_policy_loss_clipping_hand_built():
    # ratios 2.0, 2.0, 0.5, 0.5, 1.1 against cliprange 0.2
    ratios = torch.tensor([[2.0, 2.0, 0.5, 0.5, 1.1]], dtype=F64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]], dtype=F64)
    old_logprobs = torch.full((1, 5), -1.0, dtype=F64)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # per token max(-A*r, -A*clip(r)):
    #   A>0, r=2   -> max(-2, -1.2) = -1.2  (clipped)     A<0, r=2   -> max(2, 1.2) = 2  (unclipped)
    #   A>0, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped)  A<0, r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    #   A>0, r=1.1 inside the range -> -1.1
    assert_close(loss, scalar((-1.2 + 2.0 - 0.5 + 0.8 - 1.1) / 5))
    assert_close(stats["clipfrac"], scalar(2 / 5))
    assert_close(stats["ratio_mean"], scalar((2 + 2 + 0.5 + 0.5 + 1.1) / 5))
    assert_close(stats["approx_kl"], scalar(0.5 * float((ratios.log() ** 2).mean())))
    loss.backward()
    # the clipped branch carries no gradient; the others get -A * r / N
    expected_grad = torch.tensor([[0.0, 2.0 / 5, -0.5 / 5, 0.0, -1.1 / 5]], dtype=F64)
    assert_close(logprobs.grad, expected_grad)
    assert not stats["clipfrac"].requires_grad


@pytest.mark.parametrize("cliprange_value", [None, 0.2, 1.0])
def test_value_loss_matches_loop_reference(cliprange_value):
    torch.manual_seed(16)
    B, A = 3, 5
    mask = prefix_mask([5, 2, 4], A)
    old_values = torch.randn(B, A, dtype=F64)
    values = old_values + torch.randn(B, A, dtype=F64) * 0.5
    returns = torch.randn(B, A, dtype=F64)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value)
    ref_loss, ref_stats = ref_value_loss(values, old_values, returns, mask, cliprange_value)
    assert_close(loss, scalar(ref_loss))
    assert_close(stats["clipfrac"], scalar(ref_stats["clipfrac"]))
    if cliprange_value == 0.2:
        assert float(stats["clipfrac"]) > 0


def test_value_loss_clipping_hand_built():
    old_values = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    values = torch.tensor([[1.0, 1.0, 0.1]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[0.0, 2.0, 5.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.5)
    # token 0: unclipped (1-0)^2=1 > clipped (0.5-0)^2=0.25 -> 1
    # token 1: unclipped (1-2)^2=1 < clipped (0.5-2)^2=2.25 -> 2.25 (clipped, no gradient)
    # token 2: inside the range -> (0.1-5)^2 = 24.01
    assert_close(loss, scalar(0.5 * (1.0 + 2.25 + 24.01) / 3))
    assert_close(stats["clipfrac"], scalar(1 / 3))
    loss.backward()
    assert_close(values.grad, torch.tensor([[1.0 / 3, 0.0, (0.1 - 5.0) / 3]], dtype=F64))

    plain, plain_stats = value_loss(values.detach(), old_values, returns, mask, cliprange_value=None)
    assert_close(plain, scalar(0.5 * (1.0 + 1.0 + 24.01) / 3))
    assert float(plain_stats["clipfrac"]) == 0.0


def test_explained_variance_matches_loop_reference_and_extremes():
    torch.manual_seed(17)
    mask = prefix_mask([5, 3, 4], 5)
    returns = torch.randn(3, 5, dtype=F64)
    values = returns + torch.randn(3, 5, dtype=F64) * 0.5
    values[~mask] = 1e3  # padding must not count
    expected = 1 - ref_masked_var(returns - values, mask) / ref_masked_var(returns, mask)
    assert_close(explained_variance(values, returns, mask), scalar(expected))
    assert_close(explained_variance(returns, returns, mask), scalar(1.0))  # perfect value head
    constant = torch.full_like(returns, 0.7)
    assert_close(explained_variance(constant, returns, mask), scalar(0.0))  # a constant predicts nothing
    flat = explained_variance(values, torch.ones_like(returns), mask)
    assert torch.isnan(flat)  # Var[R] = 0: undefined


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0, -1.0])
    contains_eos = torch.tensor([True, False, True, False])
    got = missing_eos_penalty(scores, contains_eos, penalty=1.5)
    expected = torch.tensor([s if eos else s - 1.5 for s, eos in zip(scores.tolist(), contains_eos.tolist())])
    assert_close(got, expected)
    assert_close(scores, torch.tensor([1.0, 2.0, 3.0, -1.0]))  # not modified in place
    assert torch.equal(missing_eos_penalty(scores, contains_eos, None), scores)


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_moves_and_round_trips():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=64)
    assert controller.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_follows_ziegler_update():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=9.0, n_steps=256)  # above target: error clipped to +0.2
    assert controller.value > 0.1
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    before = controller.value
    controller.update(current_kl=6.6, n_steps=256)  # 10% over: error 0.1, inside the clip
    assert controller.value == pytest.approx(before * (1 + 0.1 * 256 / 10_000))
    before = controller.value
    controller.update(current_kl=0.0, n_steps=512)  # far below target: error clipped to -0.2
    assert controller.value < before
    assert controller.value == pytest.approx(before * (1 - 0.2 * 512 / 10_000))
    before = controller.value
    controller.update(current_kl=6.0, n_steps=512)  # on target: no change
    assert controller.value == pytest.approx(before)


def test_adaptive_kl_controller_loop_reference_and_state_dict_round_trip():
    kls = [1.0, 8.0, 3.0, 6.5, 12.0, 0.2]
    value = 0.2
    controller = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    for kl in kls[:3]:
        controller.update(kl, n_steps=100)
        value *= 1 + min(max(kl / 4.0 - 1, -0.2), 0.2) * 100 / 1000
    assert controller.value == pytest.approx(value)

    resumed = AdaptiveKLController(0.2, target=4.0, horizon=1000)  # fresh, as after a restart
    resumed.load_state_dict(controller.state_dict())
    for kl in kls[3:]:
        controller.update(kl, n_steps=100)
        resumed.update(kl, n_steps=100)
    assert resumed.value == controller.value
    assert resumed.value != 0.2


def test_adaptive_kl_controller_rejects_bad_config():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


# ---------------------------------------------------------------------------------------------
# RunningMoments
# ---------------------------------------------------------------------------------------------


def test_running_moments_match_statistics_over_everything_seen():
    torch.manual_seed(18)
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet: dividing by std is a no-op
    seen: list[float] = []
    for batch_size, shift in [(1, 100.0), (7, 100.0), (32, 103.0), (5, 90.0)]:  # includes a single value
        batch = torch.randn(batch_size) * 2 + shift
        batch_mean, batch_std = moments.update(batch)
        values = batch.double().tolist()
        seen += values
        assert batch_mean == pytest.approx(statistics.fmean(values))
        assert batch_std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
        assert moments.mean == pytest.approx(statistics.fmean(seen))
        assert moments.count == len(seen)
        if len(seen) > 1:
            assert moments.std == pytest.approx(statistics.stdev(seen))
    assert moments.std > 1.0  # batches with different centres: spread across batches is counted


def test_running_moments_state_dict_round_trip():
    torch.manual_seed(19)
    batches = [torch.randn(4, 3) for _ in range(4)]  # any shape is flattened
    moments = RunningMoments()
    for batch in batches[:2]:
        moments.update(batch)
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    for batch in batches[2:]:
        assert moments.update(batch) == resumed.update(batch)
    assert (resumed.mean, resumed.std, resumed.count) == (moments.mean, moments.std, moments.count)
    everything = torch.cat([b.flatten() for b in batches]).double()
    assert resumed.mean == pytest.approx(float(everything.mean()))
    assert resumed.std == pytest.approx(float(everything.std()))


def test_running_moments_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        RunningMoments().update(torch.zeros(0))


def test_module_imports_only_torch_and_stdlib():
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(ppo_core.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported - {"torch"} <= set(sys.stdlib_module_names), imported


def test_temperature_divides_after_the_upcast():
    """bf16 logits divided by 0.7 in bf16 are rounded again before the log-softmax (measured 0.018
    nats/token); dividing after the upcast leaves only the bf16 logits' own rounding."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 16, 1000, generator=g) * 4).to(torch.bfloat16)  # (B, A, V)
    tokens = torch.randint(0, 1000, (4, 16), generator=g)
    exact = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    got = logprobs_from_logits(logits, tokens, temperature=0.7)
    assert (got.double() - exact).abs().max() < 1e-4
    divided_in_bf16 = logprobs_from_logits(logits / 0.7, tokens)
    assert (divided_in_bf16.double() - exact).abs().mean() > 1e-3
    exact_entropy = -(torch.softmax(logits.double() / 0.7, -1) * torch.log_softmax(logits.double() / 0.7, -1)).sum(-1)
    assert (entropy_from_logits(logits, temperature=0.7).double() - exact_entropy).abs().max() < 1e-4
