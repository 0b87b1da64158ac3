"""The sweep's selection rule applied to a table of configurations (pure; no I/O).

`openrelease sweep` uses it to pick the released configuration and `openrelease audit` re-applies it to
the sweep table shipped in the release, so both must come from this one function. A configuration row
is `{"config": {key: value}, "mean": {metric: value}, ...}`; the rule reads only the means over seeds.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from pipeline.core.errors import ParamsError
from pipeline.core.params.sweep import SelectionRule, parse_constraint, parse_tie_break

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def _value(row: dict[str, Any], metric: str, where: str) -> float:
    means = row.get("mean") or {}
    if metric not in means:
        raise ParamsError(f"{where}: metric {metric!r} is not in the sweep table (it has: {', '.join(sorted(means))})")
    v = means[metric]
    return float("nan") if v is None else float(v)


def eligible(rule: SelectionRule, row: dict[str, Any]) -> list[str]:
    """The constraints `row` breaks, as text; empty when it is eligible. NaN breaks every constraint."""
    broken = []
    for text in rule.constraints:
        metric, op, bound = parse_constraint(text)
        v = _value(row, metric, f"sweep.selection.constraints {text!r}")
        if math.isnan(v) or not _OPS[op](v, bound):
            broken.append(f"{text} (mean {v:.4g})")
    if math.isnan(_value(row, rule.metric, "sweep.selection.metric")):
        broken.append(f"{rule.metric} is NaN")
    return broken


def select(rule: SelectionRule, rows: list[dict[str, Any]]) -> tuple[int | None, list[list[str]]]:
    """Index of the winning row (None when no row is eligible) and, per row, the constraints it broke."""
    broken = [eligible(rule, r) for r in rows]
    candidates = [i for i, b in enumerate(broken) if not b]
    if not candidates:
        return None, broken
    sign = -1.0 if rule.goal == "maximise" else 1.0
    ties = [parse_tie_break(t) for t in rule.tie_break]

    def key(i: int) -> tuple:
        parts = [sign * _value(rows[i], rule.metric, "sweep.selection.metric")]
        for metric, direction in ties:
            v = _value(rows[i], metric, "sweep.selection.tie_break")
            parts.append(math.inf if math.isnan(v) else (v if direction == "min" else -v))
        return (*parts, i)  # grid order settles what is left

    return min(candidates, key=key), broken


def config_matches(config: dict[str, Any], released: dict[str, Any]) -> list[str]:
    """Keys whose released value differs from `config` (values compared as JSON-like data)."""
    out = []
    for key, want in config.items():
        got = released.get(key, "<absent>")
        same = got == want or (isinstance(got, (int, float)) and isinstance(want, (int, float))
                               and not isinstance(got, bool) and math.isclose(float(got), float(want)))
        if not same:
            out.append(f"{key} = {got!r} (the rule's pick has {want!r})")
    return out


def holm(pvalues: list[float | None]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone) over EVERY configuration tried.

    An undefined p-value (None or NaN: a degenerate interval) counts as p = 1: the configuration was
    tried, and leaving it out of the family would shrink m and make the others look stronger. Here,
    not in the sweep wing, so `openrelease audit` recomputes the adjustment with the same function."""
    ps = [1.0 if p is None or not math.isfinite(float(p)) else float(p) for p in pvalues]
    m = len(ps)
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out
