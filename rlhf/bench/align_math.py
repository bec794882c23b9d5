"""The arithmetic of the alignment benchmark, in plain torch (tested against Monte-Carlo and loop
references in tests/test_bench_math.py).

- Bradley–Terry labels: a pair (a, b) with gold rewards (g_a, g_b) is labelled "a preferred" with
  probability sigmoid(beta * (g_a - g_b)). Knowing the gold reward, the best any reward model can do
  is to predict the likelier label, so its expected accuracy on those pairs is the mean of
  max(p, 1 - p): the Bayes-optimal accuracy.
- Best-of-n: sample n responses, keep the one the proxy reward ranks first. Its KL to the sampling
  policy is log n - (n - 1) / n nats (Stiennon et al. 2020, appendix G.3; Gao et al. 2022 eq. 1),
  exact for continuous rewards without ties.
"""

from __future__ import annotations

import math

import torch


def bt_probability(gold_a: torch.Tensor, gold_b: torch.Tensor, beta: float) -> torch.Tensor:
    """P(a preferred over b) under Bradley–Terry with inverse temperature beta; (N,) -> (N,)."""
    return torch.sigmoid(beta * (gold_a - gold_b))


def sample_bt_labels(gold_a: torch.Tensor, gold_b: torch.Tensor, beta: float,
                     generator: torch.Generator) -> torch.Tensor:
    """(N,) bool: True where the simulated labeller prefers a."""
    p = bt_probability(gold_a, gold_b, beta)
    return torch.rand(p.shape, generator=generator, dtype=p.dtype) < p


def bayes_accuracy(gold_a: torch.Tensor, gold_b: torch.Tensor, beta: float) -> float:
    """Expected accuracy, against Bradley–Terry labels, of the best possible predictor (the gold
    reward itself): mean over pairs of max(p, 1 - p)."""
    p = bt_probability(gold_a.double(), gold_b.double(), beta)
    return torch.maximum(p, 1 - p).mean().item()


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || sampling policy) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[float, float]:
    """Gold reward of best-of-n selection by the proxy: proxy, gold (P, N) hold N samples for each of
    P prompts; the N samples are cut into N // n disjoint groups of n, the proxy's favourite of each
    group is kept (the first one on ties), and the kept samples' gold rewards are averaged.
    Returns (mean, standard error over prompts)."""
    P, N = proxy.shape
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs between 1 and {N} samples per prompt")
    groups = N // n
    p = proxy[:, :groups * n].reshape(P, groups, n)
    g = gold[:, :groups * n].reshape(P, groups, n)
    pick = p.argmax(-1, keepdim=True)  # (P, groups, 1); argmax returns the first maximum
    per_prompt = g.gather(-1, pick).squeeze(-1).double().mean(-1)  # (P,)
    se = per_prompt.std().item() / math.sqrt(P) if P > 1 else float("nan")
    return per_prompt.mean().item(), se


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error of a list of numbers (se is nan for fewer than two)."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    se = (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("nan")
    return x.mean().item(), se
