"""Aggregation over seeds: mean, std, and a 95% interval covering seed and prompt variance.

The method (also on the model card):

Each member i of a configuration (seed i, k seeds) reports an estimate x_i and a 95% prompt-bootstrap
interval [lo_i, hi_i], from which its prompt-sampling standard error is se_i = (hi_i - lo_i) / (2 z),
z = 1.96. All seeds are scored on the SAME evaluation prompts, so the prompt-sampling error is shared
by the seeds and does not shrink when seeds are averaged, while the seed-to-seed error does:

    Var(mean) = s^2 / k  +  mean(se_i^2)          (s: the std of x_i over seeds)

The interval is mean +- t * sqrt(Var), with the t quantile at the Welch-Satterthwaite degrees of
freedom df = (a + b)^2 (k - 1) / a^2 for a = s^2/k, b = mean(se_i^2) (the prompt part counts as known
exactly, df = infinity): with few seeds and little prompt noise it is a t-interval over seeds, with
much prompt noise it tends to the prompt interval. One seed: the prompt interval alone (flagged).
It counts part of the seed-by-prompt interaction twice, so it errs wide; tests/test_sweep.py checks
its coverage on synthetic data with a known mean.

Degenerate data give no interval (NaN), never [mean, mean]: a member whose metric has interval keys
but NaN bounds (pipeline/eval/stats.py found no variability to bound, or too few prompts), or a
configuration with no variance at all. Its p-value is then undefined (None); Holm still counts it, as
p = 1, so the family is every configuration tried.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.core.selection import holm  # noqa: F401 (Holm lives in core: the audit recomputes it too)

Z975 = 1.959963984540054


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def prompt_se(metrics: dict[str, Any], name: str) -> float | None:
    """The member's prompt-sampling standard error of `name`: None when the metric has no interval
    keys (a length, a KL: no prompt bootstrap), NaN when it has them but no finite interval."""
    lo_key, hi_key = f"{name}_ci_low", f"{name}_ci_high"
    if lo_key not in metrics and hi_key not in metrics:
        return None
    lo, hi = metrics.get(lo_key), metrics.get(hi_key)
    if _finite(lo) and _finite(hi) and float(hi) > float(lo):
        return (float(hi) - float(lo)) / (2 * Z975)
    return math.nan


def combine(values: list[float], ses: list[float | None], level: float = 0.95) -> dict[str, Any]:
    """Mean, std over seeds, standard error and interval of one metric of one configuration."""
    from scipy import stats

    xs = [float(v) for v in values if _finite(v)]
    k = len(xs)
    if k == 0:
        return {"mean": None, "std": None, "se": None, "ci_low": None, "ci_high": None, "df": None, "n": 0}
    mean = sum(xs) / k
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (k - 1)) if k > 1 else None
    known = [s for s in ses if s is not None]
    undefined = {"mean": mean, "std": std, "se": None, "ci_low": math.nan, "ci_high": math.nan, "df": None, "n": k}
    if any(math.isnan(s) for s in known):  # a member's prompt interval is undefined: so is the combined one
        return undefined
    b = sum(s * s for s in known) / len(known) if known else 0.0
    a = (std * std / k) if std is not None else 0.0
    var = a + b
    if var <= (1e-12 * max(1.0, abs(mean))) ** 2:  # identical seeds (to rounding), no prompt interval:
        return undefined                             # nothing measured the uncertainty
    df = (a + b) ** 2 * (k - 1) / (a * a) if a > 0 else math.inf
    q = stats.t.ppf(0.5 + level / 2, df) if math.isfinite(df) else stats.norm.ppf(0.5 + level / 2)
    se = math.sqrt(var)
    return {"mean": mean, "std": std, "se": se, "ci_low": mean - q * se, "ci_high": mean + q * se,
            "df": df if math.isfinite(df) else None, "n": k}


def p_better(est: dict[str, Any], null: float, goal: str) -> float | None:
    """One-sided p-value of 'this configuration beats the base' (H0: no better than `null`)."""
    from scipy import stats

    if est.get("mean") is None or not est.get("se"):
        return None
    t = (est["mean"] - null) / est["se"] * (1 if goal == "maximise" else -1)
    df = est.get("df")
    return float(stats.t.sf(t, df) if df else stats.norm.sf(t))


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every metric reported by the members: numeric keys that are not an interval bound of another."""
    names: set[str] = set()
    for r in rows:
        names |= {k for k, v in (r.get("metrics") or {}).items() if _finite(v) or v is None}
    bounds = {n for n in names for suf in ("_ci_low", "_ci_high") if n.endswith(suf) and n.removesuffix(suf) in names}
    return sorted(names - bounds)


def aggregate(rows: list[dict[str, Any]], n_configs: int) -> list[dict[str, Any]]:
    """One entry per configuration, in grid order, from member rows carrying `config_index` and `metrics`."""
    names = metric_names(rows)
    out = []
    for ci in range(n_configs):
        members = [r for r in rows if r["config_index"] == ci]
        entry: dict[str, Any] = {"config_index": ci, "config": members[0]["config"] if members else {},
                                 "seeds": [r["seed"] for r in members], "members": [r["name"] for r in members],
                                 "mean": {}, "std": {}, "se": {}, "ci_low": {}, "ci_high": {}}
        for name in names:
            est = combine([r["metrics"].get(name) for r in members], [prompt_se(r["metrics"], name) for r in members])
            for part in ("mean", "std", "se", "ci_low", "ci_high"):
                entry[part][name] = est[part]
        out.append(entry)
    return out
