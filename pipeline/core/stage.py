"""What every stage's `main()` shares: params, tracking, lineage, one-line errors.

A stage module declares `STAGE` (its DVC stage name) and `READS` (the params keys it reads, exactly as
listed in dvc.yaml) and calls `stage_main(STAGE, READS, body)`, where `body(ctx)` does the work through
the stage's pure `run(...)` and records what it read and wrote on `ctx`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import OpenReleaseError
from pipeline.core.io import atomic_write_json
from pipeline.core.lineage import Artifact, LineageRecord, git_state, sha256_json
from pipeline.core.params import Params, load_params
from pipeline.core.runs import write_run_record

log = logging.getLogger(__name__)

# Every stage reads these besides its own keys: where to track and where to write lineage.
COMMON_READS = ("tracking", "paths.lineage")


@dataclass
class StageContext:
    stage: str
    params: Params
    root: Path
    record: LineageRecord
    run: Any = None  # pipeline.core.tracking.StageRun, or the worker's RemoteStageRun
    metrics: dict[str, float] = field(default_factory=dict)
    # Facts of this execution only (durations, resource use, cache hits, commit, run ids): they go to
    # MLflow and the run record (pipeline.core.runs), never into a DVC output.
    run_facts: dict[str, Any] = field(default_factory=dict)

    def path(self, key: str) -> Path:
        """Absolute path of `paths.<key>` from params.yaml."""
        return self.root / getattr(self.params.paths, key)

    def add_input(self, path: str | Path, rows: int | None = None, name: str | None = None,
                  log_dataset: bool = True) -> Artifact:
        art = Artifact.of(path, rows=rows, root=self.root)
        self.record.inputs.append(art)
        if self.run is not None and log_dataset:
            self.run.log_input(path, art.sha256, name=name, context="input", rows=rows)
        return art

    def add_output(self, path: str | Path, rows: int | None = None) -> Artifact:
        art = Artifact.of(path, rows=rows, root=self.root)
        self.record.outputs.append(art)
        return art

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            self.metrics.update(metrics)
        if self.run is not None:
            self.run.log_metrics(metrics, step=step)

    def log_run_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics that differ between two runs of the same inputs (seconds, RSS, tokens/s, cache hits):
        logged to MLflow and kept in the run record, out of the lineage record and DVC metrics."""
        self.run_facts.setdefault("metrics", {}).update(metrics)
        if self.run is not None:
            self.run.log_metrics(metrics)


def configure_logging(level: str | None = None) -> None:
    """Log to stderr at `level`, else OPENRELEASE_LOG_LEVEL, else INFO."""
    level = (level or os.environ.get("OPENRELEASE_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("alembic", "urllib3", "httpx", "filelock", "git", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def logs_beside_bars():
    """Route log records through tqdm.write while a block runs, so log lines and progress bars
    never overwrite each other on the terminal."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield


def _telemetry_off() -> None:
    for k, v in (("DVC_NO_ANALYTICS", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                 ("GX_ANALYTICS_ENABLED", "false"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(k, v)


def run_stage(stage: str, reads: list[str], body: Callable[[StageContext], None],
              params_file: str | Path = "params.yaml", root: str | Path = ".") -> StageContext:
    """Load params, open the tracking run, call `body`, then write the lineage record. Raises on error."""
    from pipeline.core import runtime, tracking_worker

    _telemetry_off()
    root = Path(root).resolve()
    params = load_params(root / params_file if not Path(params_file).is_absolute() else params_file)
    keys = list(dict.fromkeys([*reads, *COMMON_READS]))
    read_values = {k: params.section_dump(k) for k in keys}
    digest = sha256_json(read_values)
    git = git_state(root)
    record = LineageRecord(stage=stage, params=read_values, params_digest=digest, code=_code(stage))
    started = _now()
    t0 = time.monotonic()
    with tracking_worker.stage_run(stage, params.tracking.experiment, digest, git, root=root,
                            timeout_s=params.tracking.connect_timeout_s) as run:
        ctx = StageContext(stage=stage, params=params, root=root, record=record, run=run)
        run.log_params(read_values)
        body(ctx)
        ctx.log_run_metrics({"wall_time_s": time.monotonic() - t0})
        record.extra.setdefault("metrics", {}).update(ctx.metrics)
        out = ctx.path("lineage") / f"{stage}.json"
        atomic_write_json(out, record.to_dict())
        run.log_artifact(out, artifact_path="lineage")
        facts = {"started_at": started, "finished_at": _now(), "git": git,
                 "mlflow": {"run_id": run.run_id, "parent_run_id": run.parent_run_id,
                            "experiment_id": run.experiment_id, "tracking_uri": _redact(run.uri)},
                 "cpu_runtime": runtime.facts(), **ctx.run_facts}
        run_file = write_run_record(root / params.paths.runs, stage, out, facts)
        run.log_artifact(run_file, artifact_path="lineage/runs")
    log.info("%s done in %.1fs", stage, time.monotonic() - t0)
    return ctx


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _code(stage: str) -> dict[str, str]:
    """The stage module and the sha256 of its source with its whole pipeline import closure."""
    from pipeline.core.imports import code_sha256, module_path

    module = f"pipeline.stages.{stage}"
    return {"module": module, "sha256": code_sha256(module)} if module_path(module) else {}


def _redact(uri: str) -> str:
    """Never record credentials embedded in a tracking URI."""
    from urllib.parse import urlparse

    p = urlparse(uri)
    if p.password or p.username:
        return p._replace(netloc=p.hostname + (f":{p.port}" if p.port else "")).geturl()
    return uri


def stage_main(stage: str, reads: list[str], body: Callable[[StageContext], None]) -> None:
    """Entry point for `python -m pipeline.stages.<stage>`: one line and a non-zero exit on error."""
    configure_logging()
    try:
        with logs_beside_bars():
            run_stage(stage, reads, body)
    except OpenReleaseError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
