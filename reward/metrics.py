"""Metrics of reward models and classifiers. Pure math on tensors: imports only torch.

Shapes: `N` pairs or examples, `C` classes or labels.

Pairwise (reward models), with d = r_chosen - r_rejected:
- accuracy: fraction of pairs with d > 0 (a tie counts half);
- the Bradley-Terry loss mean(-log sigmoid(d));
- calibration: the model says "chosen wins with probability sigmoid(d)". Top-label expected
  calibration error (Guo et al. 2017, https://arxiv.org/abs/1706.04599): each pair's confidence is
  max(p, 1 - p) for the side the model prefers; pairs are binned by confidence over [0.5, 1] and
  ECE = sum_b n_b / N * |accuracy_b - confidence_b|.

Classification: precision, recall and F1 at a decision rule (argmax for single-label, probability
>= threshold per label for multi-label), ROC-AUC from the scores (Mann-Whitney U, ties counted half),
per label and macro-averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _num(x) -> float | None:
    """A JSON-safe float: NaN (undefined) becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------------------------
# Pairwise


def pairwise_correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(N,) 1 where chosen scores higher, 0.5 for a tie, 0 otherwise."""
    d = chosen - rejected
    return (d > 0).float() + 0.5 * (d == 0).float()


def expected_calibration_error(d: torch.Tensor, n_bins: int = 10) -> tuple[float, list[dict]]:
    """Top-label ECE of p = sigmoid(d), d = r_chosen - r_rejected of N pairs, in `n_bins` equal-width
    confidence bins over [0.5, 1]. Returns (ece, one row per non-empty bin)."""
    p = torch.sigmoid(d.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (d > 0).double() + 0.5 * (d == 0).double()
    # bin b holds confidence in [0.5 + b w, 0.5 + (b + 1) w); confidence 1.0 goes to the last bin
    index = ((confidence - 0.5) / (0.5 / n_bins)).floor().long().clamp(0, n_bins - 1)
    ece, table = 0.0, []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        if n == 0:
            continue
        acc, conf = correct[mask].mean().item(), confidence[mask].mean().item()
        ece += n / len(d) * abs(acc - conf)
        table.append({"bin": [0.5 + b * 0.5 / n_bins, 0.5 + (b + 1) * 0.5 / n_bins], "n": n,
                      "accuracy": acc, "confidence": conf})
    return ece, table


def bucket_edges(values: torch.Tensor, n_buckets: int) -> list[float]:
    """Edges of at most `n_buckets` buckets holding about equal numbers of `values` (quantiles);
    with `n_buckets` or fewer distinct values, one bucket per value."""
    distinct = torch.unique(values)
    if len(distinct) <= n_buckets:
        return [float(v) for v in distinct] + [float(distinct[-1])]
    q = torch.quantile(values.double(), torch.linspace(0, 1, n_buckets + 1, dtype=torch.double))
    return sorted(set(float(e) for e in q))


def accuracy_by_bucket(values: torch.Tensor, correct: torch.Tensor, n_buckets: int = 4) -> list[dict]:
    """Accuracy of pairs grouped by `values` (N,) into quantile buckets: [lo, hi) each, the last [lo, hi]."""
    edges = bucket_edges(values, n_buckets)
    if len(edges) == 1:
        edges = edges * 2
    rows = []
    distinct = len(torch.unique(values)) <= n_buckets
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        if distinct:
            mask = values == lo
        elif i == len(edges) - 2:
            mask = (values >= lo) & (values <= hi)
        else:
            mask = (values >= lo) & (values < hi)
        n = int(mask.sum())
        if n:
            rows.append({"range": [lo, lo if distinct else hi], "n": n, "accuracy": correct[mask].mean().item()})
    return rows


def score_stats(x: torch.Tensor) -> dict:
    """Distribution of scores (N,): mean, std (population), min, 5/25/50/75/95th percentiles, max."""
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.double))
    return {"n": len(x), "mean": x.mean().item(), "std": x.std(unbiased=False).item(), "min": x.min().item(),
            "p5": q[0].item(), "p25": q[1].item(), "p50": q[2].item(), "p75": q[3].item(), "p95": q[4].item(),
            "max": x.max().item()}


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | None = None,
                     n_buckets: int = 4, n_bins: int = 10) -> dict:
    """Everything `rlhf eval reward` reports for N pairs scored (chosen, rejected), each (N,).

    `margins` (N,), the data's own preference strength (NaN where unknown), adds accuracy by data
    margin bucket; accuracy by |d| bucket (the model's own confidence) is always there.
    """
    d = (chosen - rejected).double()
    correct = pairwise_correct(chosen, rejected).double()
    ece, table = expected_calibration_error(d, n_bins)
    out = {
        "pairs": len(d),
        "accuracy": correct.mean().item(),
        "mean_margin": d.mean().item(),
        "loss": (-F.logsigmoid(d)).mean().item(),
        "ece": ece,
        "calibration": table,
        "accuracy_by_reward_margin": accuracy_by_bucket(d.abs(), correct, n_buckets),
        "scores": {"chosen": score_stats(chosen), "rejected": score_stats(rejected),
                   "all": score_stats(torch.cat([chosen, rejected]))},
    }
    if margins is not None:
        known = ~torch.isnan(margins)
        if known.any():
            out["accuracy_by_data_margin"] = accuracy_by_bucket(margins[known].double(), correct[known], n_buckets)
    return out


# ---------------------------------------------------------------------------------------------
# Classification


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` (N,) for binary `labels` (N,): the probability that a
    random positive scores above a random negative, ties counted half. NaN with only one class."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = scores.double()
    pos, neg = s[labels], s[~labels]
    # pairwise comparison in chunks of positives: exact, and small N here (evaluation sets)
    wins = 0.0
    for chunk in pos.split(1024):
        diff = chunk[:, None] - neg[None, :]
        wins += (diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()
    return wins / (n_pos * n_neg)


def binary_metrics(predicted: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> dict:
    """Precision, recall, F1 of 0/1 `predicted` (N,) against `labels` (N,) (0 when undefined, as
    scikit-learn's zero_division=0), ROC-AUC of `scores`, and the number of positives."""
    predicted, labels = predicted.bool(), labels.bool()
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "roc_auc": _num(roc_auc(scores, labels)),
            "support": int(labels.sum())}


def _macro(per_label: dict[str, dict], key: str) -> float | None:
    values = [m[key] for m in per_label.values() if m[key] is not None]
    return sum(values) / len(values) if values else None


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str],
                           multi_label: bool, threshold: float = 0.5) -> dict:
    """Metrics of `logits` (N, C) against `labels`: class indices (N,) for single-label, 0/1 (N, C)
    for multi-label. Per label (one-vs-rest for single-label) and macro averages; `accuracy` is the
    fraction of examples whose predicted label set is exactly right."""
    logits = logits.double()
    if multi_label:
        probs = torch.sigmoid(logits)
        predicted = probs >= threshold
        targets = labels.bool()
        accuracy = (predicted == targets).all(dim=1).double().mean().item()
    else:
        probs = torch.softmax(logits, dim=-1)
        predicted = F.one_hot(probs.argmax(-1), len(label_names)).bool()
        targets = F.one_hot(labels.long(), len(label_names)).bool()
        accuracy = (probs.argmax(-1) == labels.long()).double().mean().item()
    per_label = {name: binary_metrics(predicted[:, c], targets[:, c], probs[:, c])
                 for c, name in enumerate(label_names)}
    out = {"n": len(logits), "accuracy": accuracy}
    for key in ("precision", "recall", "f1", "roc_auc"):
        out[key] = _macro(per_label, key)
    if multi_label:  # micro-averaged F1: every (example, label) decision counted once
        micro = binary_metrics(predicted.flatten(), targets.flatten(), probs.flatten())
        out["micro_f1"] = micro["f1"]
    out["per_label"] = per_label
    return out


def majority_logits(train_labels: torch.Tensor, n: int, num_labels: int, multi_label: bool) -> torch.Tensor:
    """Logits (n, C) of the majority-class baseline: always the most frequent training class
    (single-label), or each label's more frequent training value (multi-label)."""
    if multi_label:
        majority = train_labels.double().mean(0) > 0.5  # (C,)
        row = torch.where(majority, 10.0, -10.0)
    else:
        counts = torch.bincount(train_labels.long(), minlength=num_labels)
        row = torch.full((num_labels,), -10.0)
        row[counts.argmax()] = 10.0
    return row.double().expand(n, num_labels).clone()
