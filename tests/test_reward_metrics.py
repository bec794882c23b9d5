"""Reward-model and classifier metrics (reward/metrics.py) against values worked out by hand."""

import math

import pytest
import torch

from reward import metrics as m


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_pairwise_accuracy_counts_ties_half_and_loss_is_bradley_terry():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])
    out = m.pairwise_metrics(chosen, rejected)
    assert out["accuracy"] == pytest.approx(0.5)  # right, tie, wrong
    assert out["mean_margin"] == pytest.approx(0.0)
    expected_loss = (-math.log(sigmoid(1)) - math.log(0.5) - math.log(sigmoid(-1))) / 3
    assert out["loss"] == pytest.approx(expected_loss)


def test_expected_calibration_error_by_hand():
    d = torch.tensor([3.0, -1.0, 0.2, 2.0])
    # confidences max(p, 1-p): 0.9526 (right), 0.7311 (wrong), 0.5498 (right), 0.8808 (right)
    conf = [sigmoid(3), 1 - sigmoid(-1), sigmoid(0.2), sigmoid(2)]
    # 2 bins over [0.5, 1]: [0.5, 0.75) holds pairs 2 and 3, [0.75, 1] pairs 1 and 4
    low = abs(0.5 - (conf[1] + conf[2]) / 2)
    high = abs(1.0 - (conf[0] + conf[3]) / 2)
    ece, table = m.expected_calibration_error(d, n_bins=2)
    assert ece == pytest.approx(0.5 * low + 0.5 * high)
    assert [row["n"] for row in table] == [2, 2]
    assert table[0]["accuracy"] == 0.5 and table[1]["accuracy"] == 1.0
    # 10 bins: every pair alone in its bin
    ece10, table10 = m.expected_calibration_error(d, n_bins=10)
    assert ece10 == pytest.approx((1 - conf[0] + conf[1] + 1 - conf[2] + 1 - conf[3]) / 4)
    assert [row["bin"][0] for row in table10] == pytest.approx([0.5, 0.7, 0.85, 0.95])


def test_accuracy_by_bucket_distinct_values_and_quantiles():
    rows = m.accuracy_by_bucket(torch.tensor([1.0, 1, 2, 2, 3]), torch.tensor([1.0, 0, 1, 1, 0]), n_buckets=4)
    assert [(r["range"][0], r["n"], r["accuracy"]) for r in rows] == [(1, 2, 0.5), (2, 2, 1.0), (3, 1, 0.0)]
    values = torch.arange(8.0)
    correct = torch.tensor([0.0, 0, 0, 1, 1, 1, 1, 1])
    rows = m.accuracy_by_bucket(values, correct, n_buckets=4)
    assert [r["n"] for r in rows] == [2, 2, 2, 2]
    assert [r["accuracy"] for r in rows] == [0.0, 0.5, 1.0, 1.0]
    assert rows[0]["range"] == pytest.approx([0, 1.75]) and rows[-1]["range"] == pytest.approx([5.25, 7])


def test_data_margin_buckets_skip_unknown_margins():
    out = m.pairwise_metrics(torch.tensor([1.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 0]),
                             margins=torch.tensor([1.0, 1.0, 2.0, float("nan")]))
    rows = out["accuracy_by_data_margin"]
    assert [(r["range"][0], r["n"], r["accuracy"]) for r in rows] == [(1, 2, 0.5), (2, 1, 1.0)]
    assert "accuracy_by_data_margin" not in m.pairwise_metrics(torch.ones(2), torch.zeros(2),
                                                               margins=torch.tensor([float("nan")] * 2))


def test_score_stats():
    s = m.score_stats(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(1.25)) and s["min"] == 1 and s["max"] == 4
    assert s["p50"] == pytest.approx(2.5)


def test_roc_auc_by_hand_with_ties_and_one_class():
    assert m.roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives 0.5, 0.9 vs negatives 0.5, 0.2: 0.5 (tie) + 1 + 1 + 1 out of 4
    assert m.roc_auc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875)
    assert math.isnan(m.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_single_label_metrics_by_hand():
    # predicted classes 0, 1, 2, 1; true classes 0, 1, 1, 2
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 5, 0]])
    out = m.classification_metrics(logits, torch.tensor([0, 1, 1, 2]), ["a", "b", "c"], multi_label=False)
    per = out["per_label"]
    assert (per["a"]["precision"], per["a"]["recall"], per["a"]["f1"]) == (1.0, 1.0, 1.0)
    assert (per["b"]["precision"], per["b"]["recall"], per["b"]["f1"]) == (0.5, 0.5, 0.5)
    assert (per["c"]["precision"], per["c"]["recall"], per["c"]["f1"]) == (0.0, 0.0, 0.0)
    assert out["accuracy"] == 0.5
    assert (out["precision"], out["recall"], out["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert per["a"]["roc_auc"] == 1.0  # example 0 has the highest P(a)


def test_multi_label_metrics_by_hand():
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    logits = torch.tensor([[3.0, -3.0], [3.0, 3.0], [-3.0, 3.0]])  # predicted [1,0], [1,1], [0,1]
    out = m.classification_metrics(logits, labels, ["x", "y"], multi_label=True)
    assert (out["per_label"]["x"]["precision"], out["per_label"]["x"]["recall"]) == (0.5, 0.5)
    assert out["per_label"]["y"]["f1"] == 1.0
    assert out["f1"] == pytest.approx(0.75)
    assert out["micro_f1"] == pytest.approx(0.75)  # tp 3, fp 1, fn 1
    assert out["accuracy"] == pytest.approx(1 / 3)  # exact label sets
    # threshold moves the decisions: at 0.999 nothing is predicted
    assert m.classification_metrics(logits, labels, ["x", "y"], True, threshold=0.999)["f1"] == 0.0


def test_majority_baseline():
    single = m.majority_logits(torch.tensor([0, 1, 1]), 3, 2, multi_label=False)
    assert single.argmax(-1).tolist() == [1, 1, 1]
    out = m.classification_metrics(single, torch.tensor([1, 0, 1]), ["0", "1"], multi_label=False)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["roc_auc"] == 0.5
    assert out["f1"] == pytest.approx((0 + 0.8) / 2)  # class 0 never predicted; class 1: P 2/3, R 1
    multi = m.majority_logits(torch.tensor([[1, 0], [1, 0], [0, 0]]), 2, 2, multi_label=True)
    assert (torch.sigmoid(multi) > 0.5).tolist() == [[True, False], [True, False]]
