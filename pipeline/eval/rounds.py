"""The table of DPO rounds: each round's policy against the base model and against the round before.

Pure functions over evaluate's outputs (metrics/eval.json and the per-prompt tables of `paths.eval_dir`),
used by the stage `rounds_report@<rk>`. Against the base, a round's numbers are its own evaluation's
(headline with interval, degeneration, KL to the base, length). Against the previous round, the two
rounds' policies answered the same prompts greedily, so the comparison is paired per prompt: the
difference of prompt-level passes and of degenerate answers, with the same bootstrap as evaluate's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

# what each row of the table carries from its round's metrics/eval.json (the *_ci_low/_ci_high beside)
ROW_METRICS = ("pass_rate_policy", "pass_rate_delta", "test_degenerate_rate_policy", "test_degenerate_rate_delta",
               "degenerate_rate_policy", "degenerate_rate_delta", "kl", "kl_per_token", "length_policy",
               "length_ratio", "pref_accuracy", "win_rate", "dev_pass_rate_policy", "dev_pass_rate_delta",
               "dev_degenerate_rate_delta", "pass_rate_floor")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def row_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in ROW_METRICS:
        for key in (k, f"{k}_ci_low", f"{k}_ci_high"):
            if key in metrics:
                out[key] = metrics[key]
    return out


def versus_previous(prev_dir: Path, cur_dir: Path, ci: dict[str, Any], min_clusters: int) -> dict[str, float | None]:
    """Round k's policy minus round k-1's, paired by prompt on the test and dev prompts: `{set}_pass_rate`
    and `{set}_degenerate_rate` differences with intervals (None where too few prompts)."""
    import pandas as pd

    from pipeline.eval.stats import mean_diff, paired_bootstrap_ci

    out: dict[str, float | None] = {}
    for unit in ("test", "dev"):
        a, b = cur_dir / f"{unit}.parquet", prev_dir / f"{unit}.parquet"
        if not (a.is_file() and b.is_file()):
            continue
        cur, prev = pd.read_parquet(a), pd.read_parquet(b)
        if list(cur["id"]) != list(prev["id"]):
            raise ValueError(f"{a} and {b} hold other prompts: the rounds were evaluated on different sets")
        pairs = {"pass_rate": (cur["pass_policy"], prev["pass_policy"]),
                 "degenerate_rate": (~cur["valid_policy"].astype(bool), ~prev["valid_policy"].astype(bool))}
        prefix = "" if unit == "test" else "dev_"
        for name, (x, y) in pairs.items():
            est, lo, hi = paired_bootstrap_ci((np.asarray(x, float), np.asarray(y, float)), mean_diff, **ci)
            if len(cur) < min_clusters:
                lo = hi = float("nan")
            key = f"{prefix}{name}_vs_previous"
            out.update({key: est, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def pick(rows: list[dict[str, Any]], publish: str, rule: Any) -> tuple[str, str]:
    """The round the release ships and why: the last, a named one, or the rule's pick on dev metrics
    (pipeline.core.selection, the sweep's rule function; ties go to the earlier round)."""
    if publish == "last":
        return rows[-1]["round"], "rounds.publish = last"
    if publish != "rule":
        if publish not in [r["round"] for r in rows]:
            return rows[-1]["round"], f"rounds.publish = {publish} is not made yet; the last round so far"
        return publish, f"rounds.publish = {publish}"
    from pipeline.core.selection import select

    table = [{"mean": {k: _num(v) for k, v in r["metrics"].items()}} for r in rows]
    i, broken = select(rule, table)
    if i is None:
        why = "; ".join(f"{r['round']}: {', '.join(b)}" for r, b in zip(rows, broken, strict=True))
        return rows[-1]["round"], f"no round meets rounds.selection on dev ({why}); the last round"
    skipped = "; ".join(f"{r['round']} fails {', '.join(b)}" for r, b in zip(rows, broken, strict=True) if b)
    return rows[i]["round"], f"rounds.selection on dev: {rule.goal} {rule.metric}" + (f"; {skipped}" if skipped else "")


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """The headline (test pass rate, with interval) and the degenerate-answer rate across rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(rows) + 1)
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for axis, key, title in ((ax[0], "pass_rate_policy", "Test pass rate (headline)"),
                             (ax[1], "test_degenerate_rate_policy", "Degenerate test answers")):
        y = np.array([_num(r["metrics"].get(key)) for r in rows])
        lo = np.array([_num(r["metrics"].get(f"{key}_ci_low")) for r in rows])
        hi = np.array([_num(r["metrics"].get(f"{key}_ci_high")) for r in rows])
        err = np.vstack([np.where(np.isnan(lo), 0, y - lo), np.where(np.isnan(hi), 0, hi - y)])
        axis.errorbar(x, y, yerr=err, marker="o", capsize=4, label="policy (95% interval)")
        base = _num(rows[0]["metrics"].get(key.replace("_policy", "_base"))) if rows else float("nan")
        if not math.isnan(base):
            axis.axhline(base, color="grey", linestyle="--", label="base model")
        axis.set_xticks(x, [r["round"] for r in rows])
        axis.set_title(title)
        axis.set_xlabel("DPO round")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
