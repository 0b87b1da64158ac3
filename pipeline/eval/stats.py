"""Statistics for the `evaluate` stage: bootstrap intervals, win rates, length control, agreement.

Everything here is a plain function of numpy arrays so it can be checked on synthetic data with a
known answer (tests/test_evalstats.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np


def paired_bootstrap_ci(data: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], *,
                        n_resamples: int = 9999, confidence_level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high) of `statistic(*data, axis=-1)`, resampling the rows of `data` together.

    Rows are the units that were sampled (prompts): all arrays are resampled with the same indices
    (`paired=True`), so a difference between two models on the same prompts keeps its pairing. BCa
    intervals (scipy's default) are used; where BCa is undefined (few distinct values) the percentile
    interval is used. Where the data cannot show their own variability (one row, every resample giving
    the same value, e.g. every prompt passing for both models, or no method giving finite bounds) the
    bounds are NaN: a zero-width [est, est] would claim certainty, and a p-value or a combined interval
    built on it would too (pipeline/sweep/stats.py).
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    arrays = [np.asarray(a, dtype=float) for a in data]
    if not arrays or len(arrays[0]) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(*arrays, axis=-1))
    nan = float("nan")
    if len(arrays[0]) < 2:
        return estimate, nan, nan
    rng = np.random.default_rng(seed)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = bootstrap(tuple(arrays), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence_level, method=method, rng=rng)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            # zero width (to rounding): nearly every resample gave one value, so the sample shows no
            # variability for an interval to describe
            if high - low <= 1e-12 * max(1.0, abs(estimate)):
                return estimate, nan, nan
            return estimate, low, high
    return estimate, nan, nan


def mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Difference of means: the prompt-level pass-rate delta (policy minus base)."""
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def pooled_rate_diff(ok_a: np.ndarray, ok_b: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
    """Difference of pooled rates sum(ok)/sum(n): the constraint-level delta, resampled by prompt."""
    total = np.sum(n, axis=axis)
    return np.sum(ok_a, axis=axis) / total - np.sum(ok_b, axis=axis) / total


def mean_stat(a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis)


def order_score(p_policy: float) -> float:
    """One judgment in one order as a score for the policy: 1 win, 0.5 tie, 0 loss."""
    return 1.0 if p_policy > 0.5 else 0.0 if p_policy < 0.5 else 0.5


def pair_scores(p_policy_first: Sequence[float], p_policy_second: Sequence[float]) -> np.ndarray:
    """Per prompt, the mean score over the two presentation orders.

    A pair the judge decides differently in the two orders (position bias) scores 0.5, i.e. a tie;
    ties count half in the win rate.
    """
    a = np.array([order_score(p) for p in p_policy_first], dtype=float)
    b = np.array([order_score(p) for p in p_policy_second], dtype=float)
    return (a + b) / 2


def win_rate(scores: np.ndarray) -> float:
    return float(np.mean(scores)) if len(scores) else float("nan")


def lc_win_rate(scores: np.ndarray, len_diff: np.ndarray, C: float = 1.0) -> float:
    """Length-controlled win rate of one model against the base: AlpacaEval 2's GLM with one model
    (see `pipeline.eval.lc`): the mean predicted preference with the tanh-normalised length term
    set to zero. With one model there is no instruction-difficulty term."""
    from pipeline.eval.lc import length_controlled

    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return float("nan")
    n = len(scores)
    return length_controlled(["m"] * n, list(range(n)), scores, np.asarray(len_diff, dtype=float), C=C)["m"].lc_win_rate


def ratio_of_sums(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    """sum(num) / sum(den): a pooled rate over resampled clusters (pairs per prompt, say)."""
    return np.sum(num, axis=axis) / np.sum(den, axis=axis)


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[str], *, min_clusters: int,
                         n_resamples: int = 9999, confidence_level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float, int]:
    """(pooled mean, low, high, number of clusters) of `values`, resampling whole clusters.

    Several values that share a cluster (test pairs built from one prompt) are not independent
    draws: the bootstrap resamples the clusters (prompts) and recomputes the pooled mean
    sum(values) / count. With fewer than `min_clusters` clusters, or when every cluster has the same
    rate, no interval is given (NaN): a bootstrap over a handful of prompts describes those prompts,
    not the population.
    """
    values = np.asarray(values, dtype=float)
    clusters = list(clusters)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    names = sorted(set(clusters))
    index = {c: i for i, c in enumerate(names)}
    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    for v, c in zip(values, clusters, strict=True):
        sums[index[c]] += v
        counts[index[c]] += 1
    est = float(values.mean())
    if len(names) < max(2, min_clusters) or np.all(sums / counts == sums[0] / counts[0]):
        # too few prompts, or every prompt scored the same (all pairs right, say): a bootstrap cannot
        # see variability the sample does not show, and [1, 1] would claim certainty
        return est, float("nan"), float("nan"), len(names)
    _, lo, hi = paired_bootstrap_ci((sums, counts), ratio_of_sums, n_resamples=n_resamples,
                                    confidence_level=confidence_level, seed=seed)
    return est, lo, hi, len(names)


def agreement_stats(human: Sequence[str], judge: Sequence[str]) -> dict[str, float]:
    """Agreement and Cohen's kappa between human and judge labels in {"A", "B", "tie"}.

    Also the agreement on the pairs humans did not call a tie (MT-Bench's "w/o tie" view).
    """
    from sklearn.metrics import cohen_kappa_score

    human, judge = list(human), list(judge)
    n = len(human)
    if n == 0:
        return {"n": 0, "agreement": float("nan"), "kappa": float("nan"), "n_no_tie": 0,
                "agreement_no_tie": float("nan")}
    agree = float(np.mean([h == j for h, j in zip(human, judge, strict=True)]))
    if len(set(human) | set(judge)) < 2:
        kappa = float("nan")  # one label everywhere: chance agreement is 1 and kappa is undefined
    else:
        kappa = float(cohen_kappa_score(human, judge, labels=["A", "B", "tie"]))
    decided = [(h, j) for h, j in zip(human, judge, strict=True) if h != "tie"]
    no_tie = float(np.mean([h == j for h, j in decided])) if decided else float("nan")
    return {"n": n, "agreement": agree, "kappa": kappa, "n_no_tie": len(decided), "agreement_no_tie": no_tie}


def order_consistency(first: Sequence[float], second: Sequence[float]) -> float:
    """Share of pairs whose two presentation orders name the same winner.

    `first` and `second` are P(the same response better) with it shown first and second. A tie in
    either order names no winner, so it is not consistent: a judge that always answers "tie" (or
    that cannot be parsed and is counted as one) scores 0, not 1. NaN for no pairs.
    """
    a = np.array([order_score(p) for p in first], dtype=float)
    b = np.array([order_score(p) for p in second], dtype=float)
    if len(a) == 0:
        return float("nan")
    return float(np.mean((a == b) & (a != 0.5)))


AGREEMENT_LABELS = ("A", "B", "tie")


def kappa_stat(human: np.ndarray, judge: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cohen's kappa of label codes (indices into AGREEMENT_LABELS), vectorised over resamples.

    The same value as sklearn's `cohen_kappa_score` on one sample; NaN where chance agreement is 1
    (one label everywhere), where kappa is undefined.
    """
    human, judge = np.asarray(human), np.asarray(judge)
    p_o = np.mean(human == judge, axis=axis)
    p_e = sum(np.mean(human == k, axis=axis) * np.mean(judge == k, axis=axis) for k in range(len(AGREEMENT_LABELS)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_e < 1, (p_o - p_e) / (1 - p_e), np.nan)


def agreement_ci(human: Sequence[str], judge: Sequence[str], *, min_units: int, n_resamples: int = 9999,
                 confidence_level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """`agreement_stats` plus bootstrap intervals over pairs for the agreement and Cohen's kappa.

    An interval is NaN, never zero-width, where the sample cannot show its own variability: fewer
    than `min_units` pairs, every pair agreeing (or every pair disagreeing), or a kappa that is
    undefined in the sample or in a resample.
    """
    out: dict[str, float] = dict(agreement_stats(human, judge))
    nan = float("nan")
    out.update(agreement_ci_low=nan, agreement_ci_high=nan, kappa_ci_low=nan, kappa_ci_high=nan)
    n = len(human)
    agree = np.array([h == j for h, j in zip(human, judge, strict=True)], dtype=float)
    if n < max(2, min_units) or agree.min() == agree.max():
        return out
    ci = {"n_resamples": n_resamples, "confidence_level": confidence_level, "seed": seed}
    _, lo, hi = paired_bootstrap_ci((agree,), mean_stat, **ci)
    if lo < hi:  # False for NaN bounds: paired_bootstrap_ci found no interval
        out.update(agreement_ci_low=lo, agreement_ci_high=hi)
    if np.isfinite(out["kappa"]):
        code = {label: i for i, label in enumerate(AGREEMENT_LABELS)}
        h = np.array([code[x] for x in human], dtype=float)
        j = np.array([code[x] for x in judge], dtype=float)
        _, lo, hi = paired_bootstrap_ci((h, j), kappa_stat, **ci)
        if np.isfinite(lo) and np.isfinite(hi) and lo < hi:
            out.update(kappa_ci_low=lo, kappa_ci_high=hi)
    return out
