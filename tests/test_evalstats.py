"""Statistics of the evaluate stage on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.stats import (
    agreement_stats,
    lc_win_rate,
    mean_diff,
    mean_stat,
    order_score,
    pair_scores,
    paired_bootstrap_ci,
    pooled_rate_diff,
)


def test_paired_bootstrap_ci_covers_known_mean_with_expected_width():
    rng = np.random.default_rng(1)
    n = 400
    base = rng.normal(0.0, 1.0, n)
    policy = base + rng.normal(0.3, 1.0, n)  # paired difference ~ N(0.3, 1)
    est, lo, hi = paired_bootstrap_ci((policy, base), mean_diff, n_resamples=2000, seed=0)
    assert est == pytest.approx(np.mean(policy - base))
    assert lo < 0.3 < hi
    # normal theory: width = 2 * 1.96 * sd(diff) / sqrt(n)
    expected = 2 * 1.96 * np.std(policy - base, ddof=1) / np.sqrt(n)
    assert hi - lo == pytest.approx(expected, rel=0.15)


def test_pairing_matters_unpaired_noise_cancels():
    # Both models share a large per-prompt effect; the paired interval must be far narrower than
    # the spread of either model's scores.
    rng = np.random.default_rng(2)
    prompt_effect = rng.normal(0, 5, 200)
    base, policy = prompt_effect, prompt_effect + 1.0 + rng.normal(0, 0.1, 200)
    _, lo, hi = paired_bootstrap_ci((policy, base), mean_diff, n_resamples=2000)
    assert 0.9 < lo < 1.0 < hi < 1.1


def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(3)
    a = (rng.random(50) < 0.6).astype(float)
    b = (rng.random(50) < 0.4).astype(float)
    r1 = paired_bootstrap_ci((a, b), mean_diff, n_resamples=1000, seed=7)
    r2 = paired_bootstrap_ci((a, b), mean_diff, n_resamples=1000, seed=7)
    assert r1 == r2


def test_bootstrap_degenerate_data_gives_nan_bounds_never_certainty():
    # every prompt passes for both models: every resample gives the same value, and [0, 0] would claim
    # certainty; the estimate stays, the bounds are NaN
    ones = np.ones(30)
    for data, stat, want in (((ones, ones), mean_diff, 0.0), ((ones,), mean_stat, 1.0),
                             ((np.array([0.7]),), mean_stat, 0.7)):  # one prompt: nothing to resample
        est, lo, hi = paired_bootstrap_ci(data, stat, n_resamples=500)
        assert est == pytest.approx(want) and np.isnan(lo) and np.isnan(hi), (est, lo, hi)
    est, lo, hi = paired_bootstrap_ci((np.array([]),), mean_stat)
    assert np.isnan(est) and np.isnan(lo) and np.isnan(hi)
    # one differing prompt in 30 is variability: a real interval, not NaN
    some = np.ones(30)
    some[0] = 0.0
    _, lo, hi = paired_bootstrap_ci((some,), mean_stat, n_resamples=500)
    assert np.isfinite(lo) and lo < hi


def test_pooled_rate_diff_weights_prompts_by_constraint_count():
    ok_p, ok_b, n = np.array([3.0, 0.0]), np.array([1.0, 1.0]), np.array([3.0, 1.0])
    assert pooled_rate_diff(ok_p, ok_b, n) == pytest.approx(3 / 4 - 2 / 4)
    est, lo, hi = paired_bootstrap_ci((ok_p, ok_b, n), pooled_rate_diff, n_resamples=500)
    assert est == pytest.approx(0.25) and lo <= est <= hi


def test_pair_scores_position_bias_is_a_tie():
    # A judge that always answers "A": policy wins when shown first, loses when shown second.
    first = [1.0] * 10   # P(policy better) when policy is A
    second = [0.0] * 10  # P(policy better) when policy is B
    scores = pair_scores(first, second)
    assert np.all(scores == 0.5)
    assert order_score(0.5) == 0.5 and order_score(0.51) == 1.0 and order_score(0.2) == 0.0
    assert list(pair_scores([0.9, 0.1, 0.9], [0.8, 0.2, 0.5])) == [1.0, 0.0, 0.75]


def _synthetic_judgments(n: int, policy_skill: float, length_weight: float, seed: int):
    """Policy answers longer in most pairs; judge P(policy) = sigmoid(skill + w * tanh(diff/std))."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(60, 50, n)  # tokens; policy longer in ~88% of pairs
    x = np.tanh(diff / diff.std())
    p = 1 / (1 + np.exp(-(policy_skill + length_weight * x)))
    scores = (rng.random(n) < p).astype(float)
    return scores, diff


def test_lc_win_rate_removes_a_pure_length_preference():
    scores, diff = _synthetic_judgments(3000, policy_skill=0.0, length_weight=3.0, seed=0)
    raw = scores.mean()
    lc = lc_win_rate(scores, diff)
    assert raw > 0.75  # the judge loves the longer answers
    assert lc == pytest.approx(0.5, abs=0.06)


def test_lc_win_rate_keeps_a_length_independent_preference():
    skill = np.log(0.7 / 0.3)
    scores, diff = _synthetic_judgments(3000, policy_skill=skill, length_weight=0.0, seed=1)
    assert lc_win_rate(scores, diff) == pytest.approx(0.7, abs=0.05)
    assert scores.mean() == pytest.approx(0.7, abs=0.05)


def test_lc_win_rate_soft_ties_and_edge_cases():
    # ties as 0.5 with no length signal: LC equals the raw win rate
    scores = np.array([1.0, 0.5, 0.5, 0.0, 1.0, 0.5])
    diff = np.zeros(6)
    assert lc_win_rate(scores, diff) == pytest.approx(scores.mean(), abs=1e-3)
    assert lc_win_rate(np.ones(5), np.arange(5.0)) == 1.0
    assert lc_win_rate(np.zeros(5), np.arange(5.0)) == 0.0
    assert np.isnan(lc_win_rate(np.array([]), np.array([])))


def test_agreement_and_kappa_known_values():
    human = ["A", "A", "B", "B"]
    judge = ["A", "B", "B", "B"]
    s = agreement_stats(human, judge)
    # p_o = 0.75; p_e = 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa = (0.75 - 0.5) / 0.5
    assert s["agreement"] == 0.75 and s["kappa"] == pytest.approx(0.5)
    s = agreement_stats(["A", "tie", "B", "tie"], ["A", "A", "A", "tie"])
    assert s["n_no_tie"] == 2 and s["agreement_no_tie"] == 0.5 and s["agreement"] == 0.5
    assert np.isnan(agreement_stats(["A", "A"], ["A", "A"])["kappa"])


def test_cluster_bootstrap_resamples_prompts_not_pairs():
    from pipeline.eval.stats import cluster_bootstrap_ci

    rng = np.random.default_rng(0)
    # 30 prompts, 10 pairs each, every pair of a prompt right or wrong together: 30 draws, not 300
    per_prompt = rng.random(30) < 0.6
    values = np.repeat(per_prompt.astype(float), 10)
    clusters = np.repeat([f"p{i}" for i in range(30)], 10)
    est, lo, hi, k = cluster_bootstrap_ci(values, clusters, min_clusters=10, n_resamples=2000)
    assert k == 30 and est == pytest.approx(per_prompt.mean())
    _, plo, phi = paired_bootstrap_ci((values,), mean_stat, n_resamples=2000)  # pairs as if independent
    assert (hi - lo) > 2 * (phi - plo)  # ~sqrt(10) wider, as 30 clusters warrant
    est, lo, hi, k = cluster_bootstrap_ci(np.ones(3), ["a", "b", "c"], min_clusters=10)
    assert est == 1.0 and k == 3 and np.isnan(lo) and np.isnan(hi)  # 3 prompts: no [1, 1] interval
    est, lo, hi, k = cluster_bootstrap_ci(np.ones(60), [f"p{i}" for i in range(60)], min_clusters=10)
    assert est == 1.0 and k == 60 and np.isnan(lo) and np.isnan(hi)  # all right: no [1, 1] either


def test_lc_glm_with_instruction_difficulty_recovers_a_known_answer():
    from pipeline.eval.lc import length_controlled

    rng = np.random.default_rng(3)
    n_inst, thetas = 600, {"m1": 0.8, "m2": -0.4, "m3": 0.0}
    gamma = rng.normal(0, 1.5, n_inst)  # instruction difficulty: the baseline wins hard ones
    rows = []
    for m, th in thetas.items():
        diff = rng.normal(0, 300, n_inst)  # characters
        logit = th + 2.0 * np.tanh(diff / diff.std(ddof=1)) - gamma
        pref = (rng.random(n_inst) < 1 / (1 + np.exp(-logit))).astype(float)
        rows += [(m, i, p, d) for i, (p, d) in enumerate(zip(pref, diff, strict=True))]
    ms, ins, ps, ds = zip(*rows, strict=True)
    res = length_controlled(ms, ins, ps, ds, C=10.0)
    for m, th in thetas.items():
        truth = float(np.mean(1 / (1 + np.exp(-(th - gamma)))))
        assert res[m].difficulty_used and res[m].lc_win_rate == pytest.approx(truth, abs=0.05), m
        assert res[m].standard_error > 0  # difficulty makes predictions vary by instruction
    one = length_controlled(["m1"] * n_inst, range(n_inst), ps[:n_inst], ds[:n_inst])
    assert not one["m1"].difficulty_used and one["m1"].standard_error == pytest.approx(0, abs=1e-12)
