"""`openrelease sweep`: DVC experiments do the work; this module queues, waits, collects and selects.

1. `dvc repro build`: data (and the base model) are built once, in the workspace; every member's
   temporary workspace checks them out of the DVC cache instead of rebuilding.
2. One sweep parent run in MLflow; its id goes to the members through OPENRELEASE_SWEEP_RUN_ID.
3. `dvc exp run --queue -n <member> -S ... evaluate` per member, `dvc queue start -j N`. The first
   member runs alone so it fills the shared reference log-prob cache (pipeline/core/shared.py); the
   others then hit it, so the reference pass runs once per sweep.
4. `dvc exp show --json` gives every member's params and metrics: the record `paths.sweeps/<sweep_id>.json`
   (git-tracked) holds them; `dvc repro sweep_report` builds the table from it and applies the rule
   (pipeline/core/selection.py), so the table is a DVC output a fresh clone can `dvc pull`.
5. `dvc exp apply <winner's first-seed member>` then `dvc repro`: card and publish release the winner.
   Commit the record and dvc.lock, and `dvc push`, before tagging the release.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import OpenReleaseError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.core.params import Params
from pipeline.sweep import report
from pipeline.sweep.members import Member, expand, sweep_id

log = logging.getLogger(__name__)
POLL_S = 5.0
TRAIN_RUN_FACTS = ("ref_logps_cache_hit", "train_runtime_s", "setup_s")


class SweepError(OpenReleaseError):
    """A sweep step failed (a dvc command, a failed member, no eligible configuration)."""


def _dvc(*args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SweepError(f"`dvc {' '.join(args)}` exited {proc.returncode}: {tail[0]}")
    return proc


def last_stage_times(params: Params, root: Path) -> dict[str, float]:
    """Wall seconds of the latest train and evaluate stage runs in MLflow (empty when none ran)."""
    from pipeline.core import tracking

    out = {}
    for stage in ("train", "evaluate"):
        runs = tracking.find_runs(params.tracking.experiment, f"tags.`{tracking.TAG_STAGE}` = '{stage}'", root)
        runs = [r for r in runs if "wall_time_s" in r.data.metrics]
        if runs:
            out[stage] = max(runs, key=lambda r: r.info.start_time).data.metrics["wall_time_s"]
    return out


def check_no_interpolation(path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml through OmegaConf, which resolves `${...}` references; a
    member's params would then differ from the workspace's and every stage reading them would rerun."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "${" in line.split("#", 1)[0]:
            raise SweepError(f"{path.name}:{n}: {line.strip()!r}: a sweep cannot keep ${{...}} references in "
                             "params values (DVC's -S resolves them); write the value literally")


def plan(params: Params, root: Path) -> tuple[list[Member], dict[str, float]]:
    if params.sweep is None:
        raise SweepError("params.yaml: sweep: is null; add a sweep section (axes, seed_key, seeds, selection)")
    return expand(params.sweep), last_stage_times(params, root)


def copy_paths(params: Params, root: Path) -> tuple[str, ...]:
    """Untracked outputs the members need: upstream lineage records and reports (else DVC sees them
    missing and reruns every stage) and the content-keyed evaluation cache (base-model answers).

    `dvc exp run -C` copies each path into the experiment's workspace, which git has already filled with
    the tracked files, so a folder holding a tracked file (metrics/.gitignore) fails with "File exists":
    such a folder is replaced by its untracked entries, recursively."""
    p = params.paths
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.splitlines())

    def untracked(rel: str) -> list[str]:
        if rel in tracked:
            return []
        if not (root / rel).is_dir() or not any(t.startswith(rel + "/") for t in tracked):
            return [rel]
        return [x for child in sorted((root / rel).iterdir()) for x in untracked(f"{rel}/{child.name}")]

    return tuple(x for top in (p.lineage, p.reports, p.metrics, p.eval_cache) if (root / top).exists()
                 for x in untracked(top.rstrip("/")))


def queue_status(root: Path) -> dict[str, str]:
    """Experiment name -> Queued/Running/Success/Failed, from `dvc queue status`."""
    out = {}
    for line in _dvc("queue", "status", root=root).stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in ("Queued", "Running", "Success", "Failed"):
            out[parts[1]] = parts[-1]
    return out


def _wait(names: list[str], root: Path, bar) -> None:
    pending = set(names)
    while pending:
        time.sleep(POLL_S)
        status = queue_status(root)
        failed = [n for n in pending if status.get(n) == "Failed"]
        if failed:
            raise SweepError(f"member {failed[0]} failed; see `dvc queue logs {failed[0]}`")
        done = {n for n in pending if status.get(n) == "Success"}
        bar.update(len(done))
        pending -= done


def collect(params: Params, members: list[Member], root: Path) -> list[dict[str, Any]]:
    """One row per member from `dvc exp show --json`: params it ran with, every eval and train metric."""
    shown = json.loads(_dvc("exp", "show", "--json", root=root).stdout or "[]")
    found: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                found[rev.get("name")] = rev.get("data") or {}
    m_eval, m_train = f"{params.paths.metrics}/eval.json", f"{params.paths.metrics}/train.json"
    rows = []
    for m in members:
        data = found.get(m.name)
        if data is None:
            raise SweepError(f"member {m.name}: not in `dvc exp show` (did it run at this commit?)")
        metrics = ((data.get("metrics") or {}).get(m_eval) or {}).get("data")
        if metrics is None:
            raise SweepError(f"member {m.name}: {m_eval} is missing from the experiment commit")
        train = ((data.get("metrics") or {}).get(m_train) or {}).get("data") or {}
        ran = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        rows.append({"name": m.name, "dvc_exp": m.name, "index": m.index, "config_index": m.config_index,
                     "config": m.config, "seed": m.seed, "params_ran": _pick(ran, [*m.config, params.sweep.seed_key]),
                     "metrics": metrics, "train": {k: train.get(k) for k in TRAIN_RUN_FACTS}})
    return rows


def _pick(raw: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        v: Any = raw
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out[key] = v
    return out


def run_sweep(params: Params, root: Path, release: bool = True, collect_only: bool = False) -> dict[str, Any]:
    """Queue and run every member (or, with `collect_only`, take the members DVC already has, e.g. pulled
    from a cluster with `dvc exp pull`), write the table, and release the rule's pick."""
    import os

    from tqdm import tqdm

    from pipeline.core import tracking

    sweep = params.sweep
    members, times = plan(params, root)
    sid = sweep_id(sweep)
    t0 = time.monotonic()
    experiment = params.tracking.experiment
    previous = tracking.find_runs(experiment, f"tags.`openrelease.sweep_id` = '{sid}'", root) if collect_only else []
    parent = (max(previous, key=lambda r: r.info.start_time).info.run_id if previous else
              tracking.start_sweep_run(experiment, f"sweep {sid}", {"openrelease.sweep_id": sid},
                                       {"sweep": sweep.model_dump(mode="json")}, root))
    status = "FAILED"
    try:
        if not collect_only:
            check_no_interpolation(root / "params.yaml")
            log.info("sweep %s: %d members; building data once (dvc repro build)", sid, len(members))
            _dvc("repro", "build", root=root)
            os.environ[tracking.ENV_SWEEP_RUN_ID] = parent  # the queue workers started below inherit it
            if sweep.jobs > 1:  # members share the cores: spinning OpenMP threads would slow them all (core/runtime.py)
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            _dvc("queue", "stop", root=root, check=False)    # idle workers of an earlier sweep hold an old environment
            # Same grid, same names: an earlier sweep's entries of these members are replaced, not mixed in.
            in_queue = queue_status(root)
            for m in members:
                if m.name in in_queue:
                    _dvc("queue", "remove", m.name, root=root, check=False)
                _dvc("exp", "remove", m.name, root=root, check=False)
            est = sum(times.values()) * len(members) or None
            with tqdm(total=len(members), desc=f"sweep {sid}", unit="member") as bar:
                if est:
                    bar.set_postfix_str(f"~{est / 60:.0f} min from the last run's stage times")
                # the first member alone fills the shared reference cache; the rest reuse it
                for batch, jobs in ((members[:1], 1), (members[1:], sweep.jobs)):
                    if not batch:
                        continue
                    for m in batch:
                        _dvc(*m.command(sweep.seed_key, queue=True, copy_paths=copy_paths(params, root))[1:], root=root)
                    _dvc("queue", "start", "-j", str(jobs), root=root)
                    _wait([m.name for m in batch], root, bar)
        rows = collect(params, members, root)
        runs = tracking.member_runs(experiment, parent, [m.name for m in members], root)
        train_runs = tracking.stage_run_metrics(experiment, runs, "train", root)
        for r in rows:
            r["mlflow_run_id"] = runs.get(r["name"])
            # the reference-cache hit and the timings are run facts: MLflow has them, not metrics/train.json
            r["train"] = {k: train_runs.get(r["name"], {}).get(k) for k in TRAIN_RUN_FACTS}
        wall = None if collect_only else time.monotonic() - t0
        rec = atomic_write_json(report.record_file(root / params.paths.sweeps, sid),
                                report.record(sweep, sid, rows, parent, wall))
        log.info("sweep %s: record %s written; building the table (dvc repro sweep_report)", sid, rec.relative_to(root))
        _dvc("repro", "sweep_report", root=root)
        reports_dir = root / params.paths.reports / "sweep"
        table = read_json(reports_dir / report.TABLE)
        written = [rec, *sorted(f for f in reports_dir.iterdir() if f.is_file()), root / params.paths.metrics / "sweep.json"]
        status = "FINISHED"
    finally:
        if not collect_only:
            _dvc("queue", "stop", root=root, check=False)
        if status != "FINISHED":
            tracking.end_sweep_run(parent, {}, [], "FAILED", root)
    tracking.end_sweep_run(parent, report.flat_summary(table, wall), written, "FINISHED", root)
    if table["winner"] is None:
        raise SweepError("no configuration meets sweep.selection.constraints; nothing to release "
                         f"(see {params.paths.reports}/sweep/{report.TABLE})")
    if release:
        release_winner(table, root)
    log.info("commit the record and the lock, then push the outputs: git add %s dvc.lock && git commit; dvc push",
             rec.relative_to(root))
    return table


def release_winner(table: dict[str, Any], root: Path) -> None:
    """Put the winner's first-seed member in the workspace and run the rest of the pipeline on it."""
    from pipeline.core.params import load_params
    from pipeline.core.selection import config_matches

    w = table["winner"]
    name = w["release_member"]
    log.info("releasing %s (%s)", name, w["label"])
    # apply restores params.yaml, dvc.lock and the member's cached outputs; it exits non-zero when an output
    # of a stage the member did not run (card, publish) is absent from the cache: `dvc repro` remakes those.
    applied = _dvc("exp", "apply", name, root=root, check=False)
    raw = load_params(root / "params.yaml").model_dump(mode="json", by_alias=True)
    got = {k: _pick(raw, [k])[k] for k in [*w["config"], table["seed_key"]]}
    wrong = config_matches({**w["config"], table["seed_key"]: w["release_seed"]}, got)
    if wrong:
        tail = (applied.stderr or applied.stdout).strip().splitlines()[-1:] or [""]
        raise SweepError(f"`dvc exp apply {name}` did not give the winner's params ({wrong[0]}): {tail[0]}")
    # Stage outputs DVC does not keep in experiment commits (lineage records) are reproduced here; the
    # weights are deterministic on CPU and the reference log-probs come from the shared cache.
    _dvc("repro", root=root)
