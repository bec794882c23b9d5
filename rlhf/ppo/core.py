"""The pure math of PPO for language models.

One generated token is one action; an episode is one response and ends at the stop (EOS) token.
Everything here is a small torch-only function (or a tiny stateful controller), so it is tested
against slow Python-loop references in `tests/test_ppo_core.py` without any trainer around it.

Shapes: B batch, A response (action) tokens, V vocabulary. Masks are bool or 0/1 tensors; a
response mask is True on the real tokens of a response (up to and including the stop token).

Main references:
- PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347
- GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593
- "The N implementation details of RLHF with PPO",
  https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo
- Huang et al. 2024, "The N+ implementation details of RLHF with PPO: a case study on TL;DR
  summarization", https://arxiv.org/abs/2403.17031
"""

import math
from typing import Callable, Literal

import torch

# Added to variances before taking square roots, as in the reference implementations.
WHITEN_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true (over all of them, or along `dim`).

    Masked-out positions may hold anything (even NaN/inf): they are selected away, not multiplied
    by 0. A mean over zero positions is 0 rather than NaN, so an all-padding row cannot poison a
    batch statistic.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    mask = mask.bool()
    total = torch.where(mask, x, 0).sum(dim=dim)
    count = mask.sum(dim=dim).clamp_min(1)  # integer count, so clamping only touches the empty case
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is true (a scalar tensor).

    With `unbiased`, Bessel's correction n/(n-1) is applied. With fewer than two masked values the
    variance is 0 (there is no spread to measure), not NaN.
    """
    mask = mask.bool()
    x = torch.where(mask, x, 0)  # so garbage in padding never reaches a product or a gradient
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean) using only the positions where `mask` is true.

    `shift_mean=False` keeps the original mean, which is how the reference code whitens rewards
    (only advantages get a zero mean), see "Reward normalisation"/"Advantage whitening" in
    https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo .
    `all_reduce` (a function summing a tensor over every process) takes the mean and variance over
    the global batch, as the N+ details do: each process whitening its own slice would give each
    a different scale. Masked positions are returned as 0, so padding never looks like a (whitened) signal.
    """
    mask = mask.bool()
    x = torch.where(mask, x, 0)
    if all_reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        mean, var = global_masked_moments(x, mask, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of the masked values of `x` on every process together.
    `all_reduce(t)` returns the sum of `t` over processes (the identity on one process). Two passes
    (sum and count, then squared deviations from the global mean): no cancellation of E[x^2] - E[x]^2."""
    mask = mask.bool()
    x = torch.where(mask, x, 0)
    totals = all_reduce(torch.stack([x.sum(), mask.sum().to(x.dtype)]))  # (2,): sum, count
    n = totals[1]
    mean = totals[0] / n.clamp_min(1)
    sq = all_reduce(torch.where(mask, (x - mean) ** 2, 0).sum())
    return mean, sq / (n - 1).clamp_min(1)


def token_share_weight(tokens_here: torch.Tensor, tokens_all: torch.Tensor, grad_accum: int = 1,
                       world: int = 1) -> torch.Tensor:
    """Weight of a micro-batch's token-mean loss so that the accumulated, process-averaged gradient is
    the token mean over the whole mini-batch of every process: its share of all the mini-batch's
    response tokens, times the gradient-accumulation steps and the processes that accelerate/DDP
    divide by. Without it, a process (or micro-batch) with short responses weighs as much as one with
    long ones (the N+ details' token-level loss)."""
    return tokens_here / tokens_all.clamp_min(1) * grad_accum * world


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ---------------------------------------------------------------------------------------------


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 log-softmax loses several bits; do the reduction in at least float32.
    return torch.promote_types(dtype, torch.float32)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each taken token: log_softmax(logits / temperature)[b, t, tokens[b, t]].

    logits: (B, A, V), tokens: (B, A) -> (B, A) in float32 (or float64 for float64 logits).

    A full `log_softmax` materialises a second (B, A, V) tensor, which dominates memory for
    large vocabularies. Instead we gather the taken logit and subtract a logsumexp computed one
    batch row at a time, so the temporary is only (A, V). Same value, same gradient.
    The temperature divides after the upcast: dividing bf16 logits rounds them again (measured
    0.018 nats/token at T=0.7).
    """
    acc = _accumulate_dtype(logits.dtype)
    token_logits = logits.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1).to(acc) / temperature  # (B, A)
    logsumexp = torch.stack([torch.logsumexp(row.to(acc) / temperature, dim=-1) for row in logits])  # (B, A)
    return token_logits - logsumexp


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits / temperature) at each position:
    H = logsumexp(z) - sum_v p_v z_v.

    logits: (B, A, V) -> (B, A). Computed one batch row at a time (upcast first), like `logprobs_from_logits`.
    """
    acc = _accumulate_dtype(logits.dtype)
    rows = []
    for row in logits:  # row: (A, V)
        row = row.to(acc) / temperature
        probs = torch.softmax(row, dim=-1)
        rows.append(torch.logsumexp(row, dim=-1) - (probs * row).sum(dim=-1))  # (A,)
    return torch.stack(rows)  # (B, A)


# ---------------------------------------------------------------------------------------------
# Episode boundaries: the stop token ends the episode
# ---------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of `bools` (B, A) -> (B,) long; A when a row has none."""
    num_cols = bools.size(-1)
    positions = torch.arange(num_cols, device=bools.device)  # (A,)
    return torch.where(bools, positions, num_cols).min(dim=-1).values


def truncate_after_stop_token(
    responses: torch.Tensor, stop_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad everything after the first stop token and build the response mask.

    responses: (B, A) token ids -> (responses (B, A), response_mask (B, A) bool).

    The stop token itself stays inside the mask: emitting it is the policy's last action, and
    it is where the score is credited (`per_token_rewards`). A row without a stop token is kept
    whole. Generation keeps sampling after EOS for rows that finished early, so the tail must be
    cut ("Consistent padding/truncation" in
    https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo ).
    """
    if stop_token_id == pad_token_id:
        # With PAD == EOS the mask could no longer be recovered from token ids downstream.
        raise ValueError(f"stop_token_id and pad_token_id are both {stop_token_id}; they must differ")
    stop_index = first_true_indices(responses == stop_token_id)  # (B,), A when no stop token
    positions = torch.arange(responses.size(1), device=responses.device)  # (A,)
    response_mask = positions.unsqueeze(0) <= stop_index.unsqueeze(1)  # (B, A)
    responses = torch.where(response_mask, responses, pad_token_id)
    return responses, response_mask


# ---------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# ---------------------------------------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference), (B, A) -> (B, A).

    Sign convention: tokens were sampled from the policy p, and q is the reference model. With
    log r = log q(x) - log p(x) (so r = q/p), from Schulman's note
    http://joschu.net/blog/kl-approx.html :
    - k1 = -log r = log p - log q        unbiased, high variance, can be negative per token;
    - k2 = 0.5 * (log r)^2               biased, low variance, always >= 0;
    - k3 = (r - 1) - log r               unbiased, low variance, always >= 0.
    """
    log_ratio = ref_logprobs - logprobs  # log r = log q - log p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Reward for every action: a KL penalty on each token plus the score on the last one.

    scores: (B,), kl: (B, A), response_mask: (B, A) -> rewards (B, A), 0 at masked positions.

    The reward model judges the whole response, so its score is credited to the last action
    (index sum(mask) - 1, i.e. the stop token when there is one); the KL penalty -kl_coef * kl
    keeps every token close to the reference model (Ziegler et al. 2019, eq. 2). The mask must be
    a prefix (True then False), as built by `truncate_after_stop_token`. A row with no response
    token gets no score: there is no action to credit it to.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, 0)  # (B, A)
    lengths = mask.sum(dim=1)  # (B,)
    last_index = (lengths - 1).clamp_min(0)  # (B,)
    score = torch.where(lengths > 0, scores, 0).to(rewards.dtype)  # (B,)
    return rewards.scatter_add(1, last_index.unsqueeze(1), score.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

    rewards, values, response_mask: (B, A) -> (advantages (B, A), returns (B, A)).

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    computed backward over the real tokens of each row. The episode ends after the last real
    token, so the value after it is 0 (no bootstrapping). Masked positions are skipped, not
    treated as steps: their rewards/values are ignored, and their advantages and returns are 0.
    returns = advantages + values is the value-function target.
    """
    mask = response_mask.bool()
    num_actions = rewards.shape[1]
    advantages = torch.zeros_like(values)  # (B, A)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next real token; 0 after the end
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A of the next real token
    for t in reversed(range(num_actions)):
        real = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, advantage, 0)
        # A padding position leaves the carried state untouched, so it is invisible to the recursion.
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, 0)
    return advantages, returns


def returns_to_go(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return from each token to the end of its response: G_t = sum_{s>=t} gamma^(s-t) r_s.

    rewards, response_mask: (B, A) -> (B, A), 0 at masked positions. The advantage of REINFORCE++
    (Hu 2025, https://arxiv.org/abs/2501.03262): the per-token rewards (KL penalty on each token, the
    score on the last) summed forward, with no critic; its baseline is the normalisation of these
    returns over the global batch, which the caller applies (`masked_whiten`). Equal to `gae` with
    values 0 and lam 1.
    """
    mask = response_mask.bool()
    out = torch.zeros_like(rewards)  # (B, A)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, 0)
    return out


def sequence_returns(rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): the undiscounted sum of the rewards on the action tokens (a response's, or an episode's
    agent tokens across turns): the sequence reward that GRPO's and RLOO's group baselines compare."""
    return torch.where(action_mask.bool(), rewards, 0).sum(dim=1)


def spread(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T): each on every action token of its sequence, 0 elsewhere (GRPO, RLOO)."""
    return torch.where(action_mask.bool(), advantages.unsqueeze(1), 0).to(advantages.dtype)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / k, k): the k responses to one prompt are consecutive rows (see `ppo.samples_per_prompt`)."""
    if rewards.dim() != 1:
        raise ValueError(f"expected one reward per response (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"a group baseline needs at least 2 responses per prompt, got group_size={group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} responses do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE with a leave-one-out baseline (RLOO; Ahmadian et al. 2024, "Back to Basics",
    https://arxiv.org/abs/2402.14740, after Kool et al. 2019): each response's baseline is the mean
    reward of the other k - 1 responses to its prompt, so it is unbiased (the baseline does not
    depend on the response it judges).

    rewards: (B,) sequence rewards (score minus the KL penalty), consecutive groups of `group_size`
    -> (B,) advantages A_i = R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean_j R_j).
    """
    g = _grouped(rewards, group_size)  # (B / k, k)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300,
    section 4.1.2, outcome supervision): A_i = (R_i - mean(R)) / std(R) over the k responses to a prompt.

    rewards: (B,), consecutive groups of `group_size` -> (B,). std is the sample standard deviation
    (Bessel-corrected); a group whose rewards are all equal gets advantage 0 (`eps` guards the division).
    `scale_by_std=False` keeps only the centring (Liu et al. 2025, "Understanding R1-Zero-like
    training", https://arxiv.org/abs/2503.20783: dividing by the std weighs prompts whose responses
    barely differ, too easy or too hard, the most).
    """
    g = _grouped(rewards, group_size)  # (B / k, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), averaged over real tokens.

    logprobs (with grad), old_logprobs, advantages, response_mask: (B, A) -> (loss (), stats).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange))), the pessimistic
    of the two, so moving the ratio outside the trust region earns nothing.
    stats (detached scalars, for `policy/...` metrics):
    - clipfrac: fraction of tokens where the clipped branch is the one taken (it has no gradient);
    - approx_kl: 0.5 * mean(log ratio^2), Schulman's k2 estimator of KL(old || new) on samples
      from the old policy, see `kl_estimate`; used to watch how far one update moves the policy;
    - ratio_mean: mean of pi_new / pi_old, which should stay close to 1.
    """
    log_ratio = logprobs - old_logprobs  # (B, A)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, averaged over real tokens.

    values (with grad), old_values, returns, response_mask: (B, A) -> (loss (), stats).

    loss = 0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)): like the policy, the
    value head is kept near its rollout-time prediction ("Value function loss clipping" in
    https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/ , used by the RLHF
    reference code). `cliprange_value=None` gives the plain 0.5 * mean((V - R)^2).
    stats: clipfrac, the fraction of tokens where the clipped branch is the larger one.
    """
    unclipped = (values - returns) ** 2  # (B, A)
    if cliprange_value is None:
        loss = 0.5 * masked_mean(unclipped, response_mask)
        return loss, {"clipfrac": torch.zeros((), dtype=values.dtype, device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), response_mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect value head, 0 no better than a
    constant, negative worse than one. NaN when the returns have no variance (undefined, as in
    cleanrl). Logged as `val/explained_variance`.
    """
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        var_residual = masked_var(returns - values, mask)
        return torch.where(var_returns == 0, math.nan, 1 - var_residual / var_returns)


def missing_eos_penalty(
    scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Subtract `penalty` from the score of each response that never emitted EOS.

    scores: (B,), contains_eos: (B,) bool -> (B,). `None` returns `scores` unchanged.
    Truncated responses are otherwise scored as if complete; penalising them teaches the policy to
    finish ("EOS trick", Huang et al. 2024, https://arxiv.org/abs/2403.17031 ). Not in place.
    """
    if penalty is None:
        return scores
    return scores - penalty * (~contains_eos.bool()).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient; `update` does nothing. Same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, section 2.2,
    https://arxiv.org/abs/1909.08593 ):

        e = clip(KL / target - 1, -0.2, 0.2),    kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    so the coefficient grows while the policy drifts further than `target` from the reference
    and shrinks while it stays closer. The clip bounds how fast it can move on one noisy batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: the measured KL (e.g. objective/kl); `n_steps`: samples since the last update."""
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only the coefficient is state; target and horizon come from the (resumed) config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------
# Running reward statistics
# ---------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and standard deviation of every value seen so far, updated one batch at a time.

    Batches are merged with the parallel update of Chan et al. (1979),
    https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm ,
    which stays accurate where accumulating sum and sum of squares would cancel. State is kept
    as Python floats in float64, so `state_dict()` is plain data. In multi-process training,
    gather the batch across processes before `update` so every process holds the same moments.
    """

    def __init__(self):
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the running mean
        self.count = 0

    @property
    def var(self) -> float:
        """Unbiased variance of everything seen; 0.0 until two values have been seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation; 1.0 until two values have been seen, so that dividing by it
        is a no-op rather than a division by zero. (It can still be 0 for constant data: add an eps.)
        """
        return math.sqrt(self.var) if self.count > 1 else 1.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold the values of `x` (any shape) in; return this batch's mean and unbiased std
        (std 0.0 for a single value)."""
        if x.numel() == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        x = x.detach().to(torch.float64).flatten()
        batch_count = x.numel()
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()

        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

        batch_std = math.sqrt(batch_m2 / (batch_count - 1)) if batch_count > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = int(state["count"])
