"""The sweep's record and results: the table (reports/sweep/table.json, CSVs), metrics/sweep.json, plots.

`openrelease sweep` writes the RECORD, `paths.sweeps/<sweep_id>.json` (git-tracked): one row per member
as DVC and MLflow reported it. The `sweep_report` stage builds the table from the record and params
`sweep` (the rule as params.yaml states it at this commit), so the table is a DVC output: pushed with
`dvc push`, restored by `dvc pull` in a fresh clone, rebuilt byte for byte by `dvc repro`.

The table is what `card` shows, what `publish` ships (with its sha256 in the manifest) and what
`openrelease audit` re-applies the selection rule to, after recomputing each configuration's mean and
seed std from the member rows.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.core.params.sweep import SweepParams
from pipeline.core.selection import select
from pipeline.sweep import stats
from pipeline.sweep.members import config_label, configs, expand, sweep_id

SCHEMA = "openrelease.sweep/1"
RECORD_SCHEMA = "openrelease.sweep-record/1"
TABLE = "table.json"
METHOD = ("mean over seeds +- t * sqrt(std^2/k + mean prompt-bootstrap se^2), Welch-Satterthwaite df "
          "(seed and prompt variance; see pipeline/sweep/stats.py)")


def build_table(sweep: SweepParams, sid: str, rows: list[dict[str, Any]], n_configs: int) -> dict[str, Any]:
    """Aggregate member rows, apply the rule, and test every configuration against the base (Holm)."""
    confs = stats.aggregate(rows, n_configs)
    rule = sweep.selection
    winner, broken = select(rule, confs)
    pvals = []
    for c, b in zip(confs, broken, strict=True):
        members = [r for r in rows if r["config_index"] == c["config_index"]]
        est = stats.combine([r["metrics"].get(rule.metric) for r in members],
                            [stats.prompt_se(r["metrics"], rule.metric) for r in members])
        c["broken_constraints"] = b
        c["p_vs_base"] = stats.p_better(est, rule.null_value, rule.goal)  # None: undefined (degenerate)
        c["df"] = est.get("df")
        pvals.append(c["p_vs_base"])
    for c, p in zip(confs, stats.holm(pvals), strict=True):  # every configuration tried is in the family
        c["p_vs_base_holm"] = p
    out: dict[str, Any] = {
        "schema": SCHEMA, "ran": True, "sweep_id": sid, "axes": sweep.axes, "seed_key": sweep.seed_key,
        "seeds": sweep.seeds, "rule": rule.model_dump(mode="json"), "headline": sweep.headline,
        "interval_method": METHOD, "members": rows, "configs": confs, "winner": None,
        "reference_passes": sum(1 for r in rows if (r.get("train") or {}).get("ref_logps_cache_hit") == 0.0),
    }
    if winner is not None:
        w = confs[winner]
        release = next((r for r in rows if r["config_index"] == winner and r["seed"] == sweep.seeds[0]), None)
        m = len(confs)  # configurations tried, whether or not their p-value is defined
        bonf = stats.combine([r["metrics"].get(rule.metric) for r in rows if r["config_index"] == winner],
                             [stats.prompt_se(r["metrics"], rule.metric) for r in rows if r["config_index"] == winner],
                             level=1 - rule.alpha / max(m, 1))
        out["winner"] = {
            "config_index": winner, "config": w["config"], "label": config_label(w["config"]),
            "release_seed": sweep.seeds[0], "release_member": release["name"] if release else None,
            "metric": rule.metric, "selected_on": "dev",
            "mean": w["mean"].get(rule.metric), "std": w["std"].get(rule.metric),
            "p_vs_base": w["p_vs_base"], "p_vs_base_holm": w["p_vs_base_holm"], "configs_tried": m,
            "bonferroni_level": 1 - rule.alpha / max(m, 1),
            "bonferroni_ci": [bonf["ci_low"], bonf["ci_high"]],
        }
    return out


def record(sweep: SweepParams, sid: str, rows: list[dict[str, Any]], mlflow_parent_run_id: str | None,
           wall_s: float | None) -> dict[str, Any]:
    """What `openrelease sweep` commits: the grid it ran and one row per member, nothing derived."""
    return {"schema": RECORD_SCHEMA, "sweep_id": sid, "axes": sweep.axes, "seed_key": sweep.seed_key,
            "seeds": sweep.seeds, "mlflow_parent_run_id": mlflow_parent_run_id, "wall_s": wall_s, "members": rows}


def record_file(folder: Path, sid: str) -> Path:
    return folder / f"{sid}.json"


def check_record(rec: Any, sweep: SweepParams, sid: str, path: Path) -> list[dict[str, Any]]:
    """The member rows of a record, after checking it is a record of this grid with every member once.
    Raises DataError naming the file, the key, the rule and the value."""
    if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
        got = rec.get("schema") if isinstance(rec, dict) else type(rec).__name__
        raise DataError(path, "schema", f"a sweep record ({RECORD_SCHEMA})", repr(got))
    for key, want in (("sweep_id", sid), ("axes", sweep.axes), ("seed_key", sweep.seed_key), ("seeds", sweep.seeds)):
        if rec.get(key) != want:
            raise DataError(path, key, f"equals params.yaml sweep ({key} {want!r})",
                            f"{rec.get(key)!r}; rerun `openrelease sweep` for this grid")
    rows = rec.get("members")
    if not isinstance(rows, list):
        raise DataError(path, "members", "a list of member rows", type(rows).__name__)
    by_name = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("metrics"), dict) or "name" not in r:
            raise DataError(path, f"members[{i}]", "a row with name and metrics", repr(r)[:80])
        if r["name"] in by_name:
            raise DataError(path, f"members[{i}]", "each member once", f"{r['name']} repeats")
        by_name[r["name"]] = r
    for m in expand(sweep):
        r = by_name.pop(m.name, None)
        if r is None:
            raise DataError(path, "members", "every member of the grid", f"{m.name} is missing")
        got = (r.get("config_index"), r.get("config"), r.get("seed"))
        if got != (m.config_index, m.config, m.seed):
            raise DataError(path, f"members {m.name}", f"config_index {m.config_index}, config {m.config}, "
                            f"seed {m.seed}", f"{got!r}")
    if by_name:
        raise DataError(path, "members", "members of this grid only", f"{sorted(by_name)[0]} is not one")
    return rows


def table_from_record(sweep: SweepParams, rec: dict[str, Any], path: Path) -> dict[str, Any]:
    """The sweep table of a record, with the rule and headline of params.yaml `sweep`."""
    sid = sweep_id(sweep)
    rows = check_record(rec, sweep, sid, path)
    table = build_table(sweep, sid, rows, len(configs(sweep)))
    table["mlflow_parent_run_id"] = rec.get("mlflow_parent_run_id")
    table["wall_s"] = rec.get("wall_s")
    return table


def not_run_table(sid: str | None, reason: str) -> dict[str, Any]:
    """The table when no sweep record matches params.yaml: the card then says no sweep was run."""
    return {"schema": SCHEMA, "ran": False, "sweep_id": sid, "reason": reason}


def flat_summary(table: dict[str, Any], wall_s: float | None) -> dict[str, float]:
    """metrics/sweep.json: flat numbers for `dvc metrics show`."""
    if not table.get("ran", True):
        return {"members": 0, "configs": 0, "reference_passes": 0}
    out: dict[str, float] = {"members": len(table["members"]), "configs": len(table["configs"]),
                             "reference_passes": table["reference_passes"]}
    if wall_s is not None:
        out["wall_s"] = wall_s
    w = table.get("winner")
    if w:
        out["winner_config_index"] = w["config_index"]
        for k in ("mean", "std", "p_vs_base", "p_vs_base_holm"):
            if w.get(k) is not None:
                out[f"winner_{w['metric']}_{k}"] = w[k]
        conf = table["configs"][w["config_index"]]
        for name in table["headline"]:
            for part in ("mean", "std", "ci_low", "ci_high"):
                v = conf[part].get(name)
                if v is not None:
                    out[f"winner_{name}_{part}"] = v
    return out


def _csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def write(table: dict[str, Any], reports_dir: Path, plots_dir: Path, metrics_file: Path,
          wall_s: float | None) -> list[Path]:
    """Write every sweep output; returns the files written."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when no sweep ran
    written = [atomic_write_json(reports_dir / TABLE, table)]
    if not table.get("ran", True):
        return [*written, atomic_write_json(metrics_file, flat_summary(table, wall_s))]
    names = stats.metric_names(table["members"])
    axes = list(table["axes"])
    member_rows = [{"name": r["name"], "seed": r["seed"], "mlflow_run_id": r.get("mlflow_run_id"),
                    **{a: json.dumps(r["config"][a]) for a in axes},
                    **{n: r["metrics"].get(n) for n in names},
                    **{f"{n}_ci_low": r["metrics"].get(f"{n}_ci_low") for n in names},
                    **{f"{n}_ci_high": r["metrics"].get(f"{n}_ci_high") for n in names}} for r in table["members"]]
    cols = ["name", "seed", "mlflow_run_id", *axes, *[c for n in names for c in (n, f"{n}_ci_low", f"{n}_ci_high")]]
    written.append(atomic_write_text(reports_dir / "members.csv", _csv(member_rows, cols)))
    conf_rows = [{"config": config_label(c["config"]), **{f"{n}_{p}": c[p].get(n) for n in names
                  for p in ("mean", "std", "ci_low", "ci_high")}, "p_vs_base_holm": c.get("p_vs_base_holm")}
                 for c in table["configs"]]
    ccols = ["config", *[f"{n}_{p}" for n in names for p in ("mean", "std", "ci_low", "ci_high")], "p_vs_base_holm"]
    written.append(atomic_write_text(reports_dir / "configs.csv", _csv(conf_rows, ccols)))
    for name in table["headline"]:
        if name not in names:
            continue
        rows = [{"config": config_label(c["config"]), "mean": c["mean"][name], "std": c["std"][name],
                 "ci_low": c["ci_low"][name], "ci_high": c["ci_high"][name]} for c in table["configs"]]
        written.append(atomic_write_text(plots_dir / f"{name}.csv",
                                         _csv(rows, ["config", "mean", "std", "ci_low", "ci_high"])))
        for axis in axes:
            written.append(plot_metric_vs_axis(table, name, axis, reports_dir / f"{name}_vs_{axis.split('.')[-1]}.png"))
    written.append(atomic_write_json(metrics_file, flat_summary(table, wall_s)))
    return written


def plot_metric_vs_axis(table: dict[str, Any], name: str, axis: str, path: Path) -> Path:
    """Config means with seed-std error bars, seeds as dots, one line per value of the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = table["axes"][axis]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xpos = {json.dumps(v): (float(v) if numeric else i) for i, v in enumerate(values)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in table["configs"]:
        rest = {k: v for k, v in c["config"].items() if k != axis}
        groups.setdefault(config_label(rest) or "all", []).append(c)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, confs in groups.items():
        xs = [xpos[json.dumps(c["config"][axis])] for c in confs]
        ys = [c["mean"].get(name) for c in confs]
        err = [c["std"].get(name) or 0.0 for c in confs]
        ax.errorbar(xs, [y if y is not None else float("nan") for y in ys], yerr=err, marker="o", capsize=5,
                    label=f"{label} (mean, seed std)")
        for c in confs:
            seeds = [r["metrics"].get(name) for r in table["members"] if r["config_index"] == c["config_index"]]
            ax.scatter([xpos[json.dumps(c["config"][axis])]] * len(seeds), seeds, s=10, color="0.5", zorder=3)
    if not numeric:
        ax.set_xticks(range(len(values)), [json.dumps(v) for v in values])
    ax.set_xlabel(axis)
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs {axis.split('.')[-1]} ({len(table['seeds'])} seeds)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    # no Software/date chunks: the same table gives the same bytes
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
