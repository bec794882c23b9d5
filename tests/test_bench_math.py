"""The alignment benchmark's arithmetic against Monte-Carlo estimates and loop references."""

import math

import pytest
import torch

from rlhf.bench import align_math as bm


def test_bayes_accuracy_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2000, generator=g), torch.rand(2000, generator=g)
    beta = 6.0
    exact = bm.bayes_accuracy(a, b, beta)
    # The gold reward's own prediction (a wins iff g_a > g_b) scored against many draws of labels.
    hits = [((bm.sample_bt_labels(a, b, beta, g)) == (a > b)).double().mean().item() for _ in range(200)]
    assert abs(sum(hits) / len(hits) - exact) < 0.003
    assert 0.5 < exact < 1.0


def test_bayes_accuracy_limits():
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    assert bm.bayes_accuracy(a, b, 0.0) == pytest.approx(0.5)
    assert bm.bayes_accuracy(a, b, 1e4) == pytest.approx(1.0)
    assert bm.bayes_accuracy(a, a, 10.0) == pytest.approx(0.5)  # ties carry no information


def test_no_predictor_beats_bayes_on_average():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4000, generator=g), torch.rand(4000, generator=g)
    labels = bm.sample_bt_labels(a, b, 4.0, g)
    noisy_predictor = (a + 0.2 * torch.randn(4000, generator=g)) > b
    acc = (noisy_predictor == labels).double().mean().item()
    assert acc < bm.bayes_accuracy(a, b, 4.0) + 0.02


def test_best_of_n_kl_formula_against_exact_discrete_kl():
    # Best-of-n over K equally likely distinct outcomes ranked by a strict order: outcome of rank i
    # (1 = worst) has probability (i/K)^n - ((i-1)/K)^n. Its KL to uniform tends to log n - (n-1)/n.
    K = 100000
    for n in (1, 2, 4, 16):
        i = torch.arange(1, K + 1, dtype=torch.float64)
        q = (i / K) ** n - ((i - 1) / K) ** n
        kl = (q * torch.log(q * K)).sum().item()
        assert kl == pytest.approx(bm.best_of_n_kl(n), abs=1e-3)
    assert bm.best_of_n_kl(1) == 0.0
    with pytest.raises(ValueError):
        bm.best_of_n_kl(0)


def test_best_of_n_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    proxy, gold = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for n in (1, 2, 3, 4, 8):
        expected = []
        for p in range(5):
            kept = []
            for start in range(0, (8 // n) * n, n):
                best = max(range(start, start + n), key=lambda j: (proxy[p, j].item(), -j))
                kept.append(gold[p, best].item())
            expected.append(sum(kept) / len(kept))
        mean, se = bm.best_of_n(proxy, gold, n)
        assert mean == pytest.approx(sum(expected) / 5)
        assert se == pytest.approx(torch.tensor(expected).std().item() / math.sqrt(5))
    assert bm.best_of_n(proxy, gold, 1)[0] == pytest.approx(gold.mean().item())


def test_best_of_n_with_the_gold_as_proxy_never_hurts():
    g = torch.Generator().manual_seed(3)
    gold = torch.rand(50, 16, generator=g)
    means = [bm.best_of_n(gold, gold, n)[0] for n in (1, 2, 4, 8, 16)]
    assert means == sorted(means) and means[-1] > means[0]


def test_synthetic_answer_and_gold_score():
    import random

    from rlhf.data import synthetic

    rng = random.Random(0)
    for _ in range(500):
        question, answer = synthetic._task(rng)
        assert synthetic.answer(question) == answer
        assert synthetic.gold_score(question, f" {answer}\n") == 1.0
        wrong = synthetic.wrong_answer(question, answer, rng)
        assert 0.0 <= synthetic.gold_score(question, wrong) < 1.0
    assert synthetic.edit_distance("kitten", "sitting") == 3
    assert synthetic.edit_distance("", "abc") == 3
    q = "Reverse the word star."
    # a near miss beats nonsense; extra text after the right answer costs reward
    assert synthetic.gold_score(q, "rats") > synthetic.gold_score(q, "rast") > synthetic.gold_score(q, "9 9 9 9 9")
    assert synthetic.gold_score(q, "rats rats") < 1.0
    assert synthetic.gold_reward([[{"role": "user", "content": q}]], ["rats"]) == [1.0]
    with pytest.raises(ValueError):
        synthetic.answer("What is love?")
