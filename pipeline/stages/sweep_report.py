"""Stage `sweep_report`: the sweep table as a DVC output, built from the committed sweep record.

Reads:  params `sweep` (the grid, the selection rule and the headline as params.yaml states them at this
        commit) and `paths.sweeps/<sweep_id>.json`, the record `openrelease sweep` wrote and the user
        committed (one row per member: its params, eval metrics, MLflow run).
Writes: `paths.reports/sweep/` (table.json, members.csv, configs.csv, one PNG per headline metric and
        axis), `paths.plots/sweep/` (`dvc plots` data) and `paths.metrics/sweep.json`.
Run:    `dvc repro sweep_report` (`openrelease sweep` runs it once the members are collected; `card`
        and `publish` depend on its output, so `dvc repro publish` runs it too).

With `sweep: null`, or no record of the grid params.yaml describes, the table says no sweep ran (and
why), and the card says so. Because the table is a cached DVC output, `dvc push` stores it and a fresh
clone's `dvc pull` restores it, so a CI release ships the same table the sweep's author saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.io import read_json
from pipeline.core.params import SweepParams
from pipeline.core.stage import StageContext, stage_main
from pipeline.sweep import report
from pipeline.sweep.members import sweep_id

STAGE = "sweep_report"
READS = ["sweep", "paths.sweeps", "paths.reports", "paths.plots", "paths.metrics"]


def run(sweep: SweepParams | None, records: Path, reports_dir: Path, plots_dir: Path,
        metrics_file: Path) -> tuple[dict[str, Any], Path | None]:
    """Build and write the table; returns it and the record it came from (None: no sweep ran)."""
    if sweep is None:
        table, rec_path = report.not_run_table(None, "params.yaml has `sweep: null`"), None
    else:
        sid = sweep_id(sweep)
        rec_path = report.record_file(records, sid)
        if rec_path.is_file():
            table = report.table_from_record(sweep, read_json(rec_path), rec_path)
        else:
            table = report.not_run_table(sid, f"no record {rec_path.name} of the grid params.yaml `sweep` "
                                              f"describes in {records.name}/ (`openrelease sweep` writes it)")
            rec_path = None
    report.write(table, reports_dir, plots_dir, metrics_file, table.get("wall_s"))
    return table, rec_path


def _body(ctx: StageContext) -> None:
    reports_dir = ctx.path("reports") / "sweep"
    table, rec_path = run(ctx.params.sweep, ctx.path("sweeps"), reports_dir, ctx.path("plots") / "sweep",
                          ctx.path("metrics") / "sweep.json")
    if rec_path is not None:
        ctx.add_input(rec_path, rows=len(table["members"]), log_dataset=False)
    ctx.add_output(reports_dir / report.TABLE)
    w = table.get("winner") or {}
    ctx.log_metrics({"sweep_ran": float(bool(table.get("ran"))), "sweep_members": float(len(table.get("members", []))),
                     **({"winner_config_index": float(w["config_index"])} if w else {})})


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
