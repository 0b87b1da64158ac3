"""Stage `rounds_report@<rk>`: the table of DPO rounds 1..k and the round a release ships.

Reads:  params `rounds` (count, publish, selection) and `evaluate.bootstrap`; the previous round's summary
        (`rounds.later.<rk>.summary_in`: round 1's `paths.metrics/eval.json` for r2, else the previous
        round's summary) and per-prompt evaluation (`eval_in`); this round's `<rounds.dir>/<rk>/metrics/eval.json`
        and `eval/`; the lineage records of every round's train and generate stages (model sha256s).
Writes: `paths.reports/rounds/<rk>/summary.json` (one row per round: its model and the model that sampled
        its data by sha256, its metrics against the base with intervals, against the previous round paired
        by prompt; the published round and why) and `paths.plots/rounds/<rk>/rounds.png`.
Run:    `dvc repro rounds_report@r2` (`python -m pipeline.stages.rounds_report --round r2`).

The card and publish stages depend on `paths.reports` and `paths.plots` as folders, so the last round's
summary reaches them without new dvc.yaml entries; they read the last round's (pipeline.core.rounds).
The pick reads dev metrics only (rounds.selection, the sweep's rule grammar); test numbers are reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core import rounds
from pipeline.core.errors import OpenReleaseError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.core.lineage import read_record, sha256_path
from pipeline.core.stage import StageContext, stage_main
from pipeline.eval.rounds import pick, row_metrics, versus_previous, write_plot

STAGE = "rounds_report"
READS = ["rounds.publish", "rounds.selection", *rounds.ROUND_READS, "evaluate.bootstrap", "paths.metrics", "paths.model", "paths.dataset", "paths.eval_dir",
         "paths.reports", "paths.plots", "paths.base_model"]
PLOT = "rounds.png"
DVC_STAGES = {STAGE: READS}  # a foreach over rounds.later: rounds_report@<rk>

log = logging.getLogger(__name__)


def _output_sha(lineage_dir: Path, stage: str, path: str) -> str | None:
    try:
        rec = read_record(lineage_dir, stage)
    except (OSError, OpenReleaseError):  # a missing or unreadable record: the sha256 shows as missing
        return None
    return next((a.sha256 for a in rec.inputs + rec.outputs if a.path == path), None)


def first_row(params: Any, root: Path) -> dict[str, Any]:
    """Round 1 from its own outputs: the ordinary pipeline's evaluation and lineage."""
    p = params.paths
    lineage = root / p.lineage
    return {"round": rounds.FIRST, "model": p.model, "model_sha256": _output_sha(lineage, "train", p.model),
            "sampled_by": p.base_model, "sampled_by_sha256": _output_sha(lineage, "generate", p.base_model),
            "trained_from": p.base_model, "data": "round 1",
            "metrics": row_metrics(read_json(root / p.metrics / "eval.json")), "vs_previous": None}


def run(params: Any, name: str, root: Path) -> dict[str, Any]:
    """The summary of rounds 1..`name` (a later round)."""
    entry = params.rounds.later[name]
    if rounds.previous(name) == rounds.FIRST:
        rows = [first_row(params, root)]
    else:
        rows = list(read_json(root / entry.summary_in)["rounds"])
    mine = rounds.paths_of(params, name)
    lineage = root / params.paths.lineage
    b = params.evaluate.bootstrap
    ci = {"n_resamples": b.n_resamples, "confidence_level": b.confidence_level, "seed": b.seed}
    trained_from = entry.model_in if params.rounds.start_from == "previous" else params.paths.base_model
    rows.append({"round": name, "model": mine["model"],
                 "model_sha256": _output_sha(lineage, f"train.{name}", mine["model"]),
                 "sampled_by": entry.model_in, "sampled_by_sha256": _output_sha(lineage, f"generate.{name}", entry.model_in),
                 "trained_from": trained_from, "data": params.rounds.data,
                 "metrics": row_metrics(read_json(root / mine["metrics"] / "eval.json")),
                 "vs_previous": versus_previous(root / entry.eval_in, root / mine["eval_dir"], ci, b.min_clusters),
                 # what a release of this round reads besides the weights: the card and publish stages see
                 # these files only through this summary (their folder deps), so a change to one shows here
                 "files_sha256": {k: sha256_path(root / mine[k2] / f) if f else sha256_path(root / mine[k2])
                                  for k, k2, f in (("eval.json", "metrics", "eval.json"), ("train.json", "metrics", "train.json"),
                                                   ("data.json", "metrics", "data.json"), ("dataset", "dataset", ""))}})
    published, why = pick(rows, params.rounds.publish, params.rounds.selection)
    return {"rounds": rows, "published": published, "why": why,
            "start_from": params.rounds.start_from, "data": params.rounds.data,
            "selection": params.rounds.selection.model_dump(mode="json") if params.rounds.selection else None}


def _body_for(name: str):
    def body(ctx: StageContext) -> None:
        P = ctx.params
        if name not in P.rounds.later:
            from pipeline.core.errors import ParamsError

            raise ParamsError(f"--round {name}: not a round after the first in rounds.later ({list(P.rounds.later)})")
        entry = P.rounds.later[name]
        for path in (entry.summary_in, entry.eval_in, rounds.paths_of(P, name)["eval_dir"]):
            ctx.add_input(ctx.root / path, log_dataset=False)
        summary = run(P, name, ctx.root)
        out = ctx.root / rounds.summary_of(P, name)
        atomic_write_json(out, summary)
        ctx.add_output(out, rows=len(summary["rounds"]))
        ctx.add_output(write_plot(summary["rounds"], ctx.root / rounds.plots_dir(P, name) / PLOT))
        ctx.record.extra["rounds"] = {"published": summary["published"], "why": summary["why"],
                                      "models": {r["round"]: r["model_sha256"] for r in summary["rounds"]}}
        last = summary["rounds"][-1]
        ctx.log_metrics({k: v for k, v in {**last["metrics"], **(last["vs_previous"] or {})}.items()
                         if isinstance(v, (int, float))})
        log.info("rounds: %d so far; the release ships %s (%s)", len(summary["rounds"]), summary["published"], summary["why"])

    return body


def main() -> None:
    name = rounds.round_arg()
    stage_main(f"{STAGE}.{name}", [k.replace("${key}", name or "") for k in READS], _body_for(name or ""))


if __name__ == "__main__":
    main()
