"""Verifiable instruction following on the project's constraint prompts, with the validity rule.

Prompt-level pass = every constraint holds; constraint-level = pooled share of constraints that hold;
deltas (policy - base) get a paired bootstrap interval over prompts. The validity rule: an empty
response, or one cut at max_new_tokens before it ended, is a failed answer and meets none of its
constraints (so a model that says nothing scores 0, whatever `no_commas` or a word cap would say).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.eval.stats import mean_diff, mean_stat, paired_bootstrap_ci, pooled_rate_diff


def _ci(prefix: str, est_lo_hi: tuple[float, float, float], metrics: dict[str, float]) -> None:
    est, lo, hi = est_lo_hi
    metrics.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def valid_mask(responses: list[str], finished: list[bool | None]) -> np.ndarray:
    """The validity rule: an empty response, or one cut at max_new_tokens, is a failed answer."""
    return np.array([bool(r.strip()) and f is not False for r, f in zip(responses, finished, strict=True)])


def verifiable(rows: list[dict], resp_base: list[str], resp_pol: list[str], ci: dict,
               fin_base: list[bool | None] | None = None, fin_pol: list[bool | None] | None = None,
               min_clusters: int = 2) -> tuple[dict, Any]:
    """Prompt- and constraint-level pass rates of both models and their paired deltas, with the
    validity rule: an invalid (empty or unfinished) response meets none of its constraints."""
    import pandas as pd

    from pipeline.constraints.checkers import check

    fin_base = fin_base or [None] * len(rows)
    fin_pol = fin_pol or [None] * len(rows)
    val_b, val_p = valid_mask(resp_base, fin_base), valid_mask(resp_pol, fin_pol)
    res_b = [check(r, row["constraints"]) for r, row in zip(resp_base, rows, strict=True)]
    res_p = [check(r, row["constraints"]) for r, row in zip(resp_pol, rows, strict=True)]
    n = np.array([len(row["constraints"]) for row in rows], dtype=float)
    ok_b = np.array([sum(c["ok"] for c in r) for r in res_b], dtype=float) * val_b
    ok_p = np.array([sum(c["ok"] for c in r) for r in res_p], dtype=float) * val_p
    pass_b, pass_p = (ok_b == n).astype(float), (ok_p == n).astype(float)
    m: dict[str, float] = {"n_eval_prompts": len(rows), "n_constraints": int(n.sum())}
    few = len(rows) < min_clusters
    for key, data, stat in (("pass_rate_base", (pass_b,), mean_stat), ("pass_rate_policy", (pass_p,), mean_stat),
                            ("pass_rate_delta", (pass_p, pass_b), mean_diff)):
        est, lo, hi = paired_bootstrap_ci(data, stat, **ci)
        _ci(key, (est, float("nan"), float("nan")) if few else (est, lo, hi), m)
    m["constraint_pass_rate_base"] = float(ok_b.sum() / n.sum())
    m["constraint_pass_rate_policy"] = float(ok_p.sum() / n.sum())
    est, lo, hi = paired_bootstrap_ci((ok_p, ok_b, n), pooled_rate_diff, **ci)
    _ci("constraint_pass_rate_delta", (est, float("nan"), float("nan")) if few else (est, lo, hi), m)
    table = pd.DataFrame({
        "id": [row["id"] for row in rows], "prompt": [row["prompt"] for row in rows],
        "constraints": [json.dumps(row["constraints"]) for row in rows],
        "response_base": resp_base, "response_policy": resp_pol,
        "valid_base": val_b, "valid_policy": val_p,
        "pass_base": pass_b.astype(bool), "pass_policy": pass_p.astype(bool),
        "n_constraints": n.astype(int), "ok_base": ok_b.astype(int), "ok_policy": ok_p.astype(int),
        "checks_base": [json.dumps(r) for r in res_b], "checks_policy": [json.dumps(r) for r in res_p]})
    return m, table
