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
    intervals (scipy's default) are used; where BCa is undefined (few distinct values, e.g. every
    prompt passes for both models) the percentile interval is used, and where every resample gives
    the same value the interval collapses to that value.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    arrays = [np.asarray(a, dtype=float) for a in data]
    if not arrays or len(arrays[0]) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(*arrays, axis=-1))
    if len(arrays[0]) < 2:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = bootstrap(tuple(arrays), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence_level, method=method, rng=rng)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            return estimate, low, high
    return estimate, estimate, estimate


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
    """Length-controlled win rate, in the spirit of AlpacaEval 2.

    A logistic regression of the judge's preference for the policy on the standardised length
    difference `tanh((len_policy - len_base) / std)` (AlpacaEval 2's length feature), with soft labels:
    each prompt contributes a "policy preferred" row with weight `score` and a "base preferred" row
    with weight `1 - score`, so ties count half. The length-controlled win rate is the fitted
    probability at zero length difference, sigmoid(intercept). The L2 penalty (`C`) applies to the
    slope only (lbfgs leaves the intercept unpenalised), which keeps the fit finite when the judge
    separates the data by length perfectly.
    """
    from sklearn.linear_model import LogisticRegression

    scores = np.asarray(scores, dtype=float)
    len_diff = np.asarray(len_diff, dtype=float)
    if len(scores) == 0:
        return float("nan")
    if np.all(scores == scores[0]) and scores[0] in (0.0, 1.0):
        return float(scores[0])  # one class only: no regression to fit, and length explains nothing
    std = float(np.std(len_diff))
    x = np.tanh(len_diff / std) if std > 0 else np.zeros_like(len_diff)
    X = np.concatenate([x, x])[:, None]
    y = np.concatenate([np.ones_like(scores), np.zeros_like(scores)])
    w = np.concatenate([scores, 1 - scores])
    keep = w > 0
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000)
    model.fit(X[keep], y[keep], sample_weight=w[keep])
    return float(1 / (1 + np.exp(-model.intercept_[0])))


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
