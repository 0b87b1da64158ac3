"""Length-controlled win rate: AlpacaEval 2's GLM (Dubois et al. 2024, "Length-Controlled AlpacaEval").

AlpacaEval's `length_controlled_v1` (alpaca_eval/metrics/glm_winrate.py) fits, per model m against a
fixed baseline, a logistic regression of the judge's preference for m with the formula

    tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline - 1      (no separate intercept)

where `std_delta_len` is the length difference of the two outputs divided by its standard deviation
over the instructions (pandas' std, ddof=1; lengths in characters), `instruction_difficulty` a
per-instruction value estimated from many models' judgments, and `not_gamed_baseline` a constant 1
(it plays the intercept; AlpacaEval also mixes in judgments of "gamed" verbose/concise baselines
with weight 0.2, which this project does not have). Preferences are soft labels: each instruction
is a row with label 1 weighted by the preference and a row with label 0 weighted by 1 - preference.
The LC win rate is the mean over instructions of the predicted preference with the length term set
to zero; its standard error is the standard error of the mean of those predictions (`.sem()`), as
AlpacaEval reports `lc_standard_error`.

What differs here, and why:
- Instruction difficulty needs several models judged on the same instructions. `length_controlled`
  takes judgments of any number of models against the same baseline; with two or more it first
  estimates each instruction's difficulty as an instruction fixed effect in one logistic regression
  over all models (each model with its own intercept and length slope), then fits each model's GLM
  with that difficulty as a feature. With one model (the evaluate stage: policy vs base) there is
  no difficulty term: the prediction is then the same for every instruction, so LC = sigmoid of the
  fitted constant and AlpacaEval's standard error is 0 by construction. That is why the evaluate
  stage also reports a bootstrap interval over prompts (refitting the GLM in every resample).
- AlpacaEval selects an L1 penalty by 5-fold cross-validation (liblinear). With a few dozen prompts
  that selection is itself noise, so this uses a fixed L2 penalty (`C`, params
  `evaluate.judge.lc_c`) on the length and difficulty slopes only; the constant is unpenalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LCResult:
    lc_win_rate: float
    standard_error: float  # AlpacaEval's lc_standard_error: sem of the predicted preferences
    coef: dict[str, float]
    difficulty_used: bool


def _std_delta(len_diff: np.ndarray) -> np.ndarray:
    std = float(np.std(len_diff, ddof=1)) if len(len_diff) > 1 else 0.0
    return np.tanh(len_diff / std) if std > 0 and np.isfinite(std) else np.zeros_like(len_diff)


def _fit(X: np.ndarray, pref: np.ndarray, C: float):
    """Soft-label logistic regression with an unpenalised intercept; None when one class only."""
    from sklearn.linear_model import LogisticRegression

    y = np.concatenate([np.ones(len(pref)), np.zeros(len(pref))])
    w = np.concatenate([pref, 1 - pref])
    Xd = np.concatenate([X, X])
    keep = w > 0
    if len(set(y[keep])) < 2:
        return None
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=2000)
    model.fit(Xd[keep], y[keep], sample_weight=w[keep])
    return model


def _difficulty(models: np.ndarray, instructions: np.ndarray, pref: np.ndarray, tanh_len: np.ndarray,
                C: float) -> dict[str, float]:
    """Per-instruction difficulty: the instruction fixed effects of one fit over every model."""
    names, inst = sorted(set(models)), sorted(set(instructions))
    mi = {m: i for i, m in enumerate(names)}
    ii = {x: i for i, x in enumerate(inst)}
    X = np.zeros((len(pref), 2 * len(names) + len(inst)))
    for r, (m, x) in enumerate(zip(models, instructions, strict=True)):
        X[r, mi[m]] = 1.0  # model constant (the intercept absorbs one; the L2 keeps it identified)
        X[r, len(names) + mi[m]] = tanh_len[r]
        X[r, 2 * len(names) + ii[x]] = 1.0
    model = _fit(X, pref, C)
    if model is None:
        return dict.fromkeys(inst, 0.0)
    # Sign: a higher value makes the *baseline* more likely to win (AlpacaEval's "difficulty").
    gamma = -model.coef_[0][2 * len(names):]
    gamma = gamma - gamma.mean()
    return {x: float(g) for x, g in zip(inst, gamma, strict=True)}


def length_controlled(model_ids: Sequence[str], instruction_ids: Sequence[str], preference: Sequence[float],
                      len_diff: Sequence[float], *, C: float = 1.0) -> dict[str, LCResult]:
    """LC win rate of every model in `model_ids` against the common baseline.

    One row per (model, instruction) judgment: `preference` in [0, 1] for the model over the
    baseline (ties 0.5), `len_diff` = len(model output) - len(baseline output) in characters.
    """
    models = np.asarray(model_ids, dtype=object)
    inst = np.asarray(instruction_ids, dtype=object)
    pref = np.asarray(preference, dtype=float)
    diff = np.asarray(len_diff, dtype=float)
    if not (len(models) == len(inst) == len(pref) == len(diff)):
        raise ValueError("model_ids, instruction_ids, preference and len_diff must have one row per judgment")
    tanh_len = np.zeros_like(diff)
    for m in set(models):  # the length is standardised per model, as AlpacaEval does for each model
        sel = models == m
        tanh_len[sel] = _std_delta(diff[sel])
    use_difficulty = len(set(models)) >= 2
    gamma = _difficulty(models, inst, pref, tanh_len, C) if use_difficulty else {}
    out = {}
    for m in sorted(set(models)):
        sel = models == m
        p, x = pref[sel], tanh_len[sel]
        d = np.array([gamma.get(i, 0.0) for i in inst[sel]]) if use_difficulty else np.zeros(sel.sum())
        if len(p) == 0:
            out[m] = LCResult(float("nan"), float("nan"), {}, use_difficulty)
            continue
        X = np.column_stack([x, d]) if use_difficulty else x[:, None]
        fit = _fit(X, p, C)
        if fit is None:  # every judgment for one side: length explains nothing, the rate is that side
            pred = np.full(len(p), float(p[0]))
            coef = {"not_gamed_baseline": float("inf") if p[0] > 0.5 else float("-inf")}
        else:
            X0 = X.copy()
            X0[:, 0] = 0.0  # the counterfactual: both outputs the same length
            pred = fit.predict_proba(X0)[:, 1]
            coef = {"tanh(std_delta_len)": float(fit.coef_[0][0]), "not_gamed_baseline": float(fit.intercept_[0])}
            if use_difficulty:
                coef["instruction_difficulty"] = float(fit.coef_[0][1])
        sem = float(np.std(pred, ddof=1) / np.sqrt(len(pred))) if len(pred) > 1 else float("nan")
        out[m] = LCResult(float(pred.mean()), sem, coef, use_difficulty)
    return out


def lc_bootstrap_ci(scores: np.ndarray, len_diff: np.ndarray, *, C: float, n_resamples: int,
                    confidence_level: float, seed: int, min_units: int) -> tuple[float, float]:
    """Percentile interval of the one-model LC win rate, resampling prompts and refitting each time."""
    scores, len_diff = np.asarray(scores, dtype=float), np.asarray(len_diff, dtype=float)
    n = len(scores)
    if n < max(2, min_units) or np.all(scores == scores[0]):
        return float("nan"), float("nan")  # too few prompts, or every judgment the same: no interval to give
    rng = np.random.default_rng(seed)
    ids = ["x"] * n
    vals = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        vals.append(length_controlled(ids, list(range(n)), scores[idx], len_diff[idx], C=C)["x"].lc_win_rate)
    alpha = (1 - confidence_level) / 2
    lo, hi = np.quantile(np.asarray(vals), [alpha, 1 - alpha])
    return float(lo), float(hi)
