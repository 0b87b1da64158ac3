"""Benchmark: a stage's fixed cost, from process start to the first line of its work, and to exit.

    .venv/bin/python bench/bench_stage_start.py [--quick] [--repeats 5] [--stages card,rate,...]

Each sample is one `python` process that does what `python -m pipeline.stages.<stage>` does (imports the
stage module, loads params, takes the git state, opens the MLflow run, writes the lineage and run
records, closes the run), with a body that does no work: it only notes the time since the parent
started the process. The parent also times the whole process, exit included.

Baseline (ratio 1.00): `in-process`, MLflow imported and opened in the stage process, as every stage did
before pipeline/core/tracking_worker.py (OPENRELEASE_TRACKING_WORKER=0). Candidate: `worker`, the
default: the stage talks to one long-lived MLflow process per tracking URI. The worker's first stage
pays its start ("worker cold", reported apart); the table's worker column is the stages after it.

Everything runs in a temporary project (a copy of params.yaml and of mlflow.db, so the runs it logs land
in neither this repo's lineage nor its MLflow store). Runs are interleaved (baseline, candidate, ...).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import child_process  # bench/child_process.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("base_model", "generate", "rate", "ingest", "decontam_set", "validate", "build", "train", "evaluate",
          "sweep_report", "card", "publish")
QUICK = ("rate", "card", "train")


def child(stage: str, root: Path, started: float) -> None:
    sys.path.insert(0, str(ROOT))
    from pipeline.core.stage import configure_logging, run_stage

    configure_logging("WARNING")
    mod = importlib.import_module(f"pipeline.stages.{stage}")
    seen: dict[str, float] = {}
    run_stage(mod.STAGE, mod.READS, lambda ctx: seen.setdefault("to_work_s", time.time() - started), root=root)
    child_process.report(seen)


def sample(stage: str, root: Path, worker: bool) -> dict[str, float]:
    env = {**os.environ, "OPENRELEASE_TRACKING_WORKER": "1" if worker else "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    t0 = time.monotonic()
    before = os.times()
    result = child_process.run([sys.executable, __file__, "--child", stage, "--root", str(root), "--t0", repr(time.time())],
                               cwd=root, env=env,
                               label=f"{stage} ({'worker' if worker else 'in-process'})")
    after = os.times()
    result["process_s"] = time.monotonic() - t0
    result["cpu_s"] = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return result


def project(tmp: Path) -> Path:
    root = tmp / "proj"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    if (ROOT / "mlflow.db").exists():
        shutil.copy(ROOT / "mlflow.db", root / "mlflow.db")
    return root


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"stages {','.join(QUICK)}, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="samples per stage and mode (default 5; --quick 3)")
    ap.add_argument("--stages", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root, args.t0)
    stages = (args.stages or ",".join(QUICK if args.quick else STAGES)).split(",")
    repeats = args.repeats or (3 if args.quick else 5)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-stage-start-") as tmp:
        root = project(Path(tmp))
        cold = sample(stages[0], root, worker=True)  # starts the worker for this project's store
        rows: dict[tuple[str, bool], list[dict[str, float]]] = {}
        for _ in range(repeats):
            for stage in stages:
                for worker in (False, True):
                    rows.setdefault((stage, worker), []).append(sample(stage, root, worker))
    print(f"\nstage fixed cost, medians of {repeats} (load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")
    print(f"worker cold (first stage, starts the worker): {cold['to_work_s']:.2f} s to work, "
          f"{cold['process_s']:.2f} s process\n")
    print("| stage | to work, in-process s | to work, worker s | ratio | process, in-process s | process, worker s "
          "| CPU in-process s | CPU worker s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stage in stages:
        a, b = rows[(stage, False)], rows[(stage, True)]
        print(f"| {stage} | {med(a, 'to_work_s'):.2f} | {med(b, 'to_work_s'):.2f} | "
              f"{med(b, 'to_work_s') / med(a, 'to_work_s'):.2f} | {med(a, 'process_s'):.2f} | {med(b, 'process_s'):.2f} | "
              f"{med(a, 'cpu_s'):.2f} | {med(b, 'cpu_s'):.2f} |")
    worst = max(med(rows[(s, True)], "to_work_s") for s in stages)
    print(f"\nworst stage to work with the worker: {worst:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
