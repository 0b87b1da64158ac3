"""Run records: the volatile facts of one stage execution, kept outside DVC's hashes.

A lineage record (`paths.lineage/<stage>.json`) is a DVC output, so it holds only what two clean runs
of one commit agree on. What differs from run to run goes to MLflow and to a run record
`paths.runs/<stage>.json` (git-ignored, not a DVC output, never pushed): when and where the stage ran,
the git commit and whether the tree was dirty, the MLflow run ids, durations and resource use. Each
run record names the sha256 of the lineage record it belongs to, so the release manifest (which reads
them at publish time) takes only records that match the lineage it publishes.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from pipeline.core.errors import OpenReleaseError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.core.lineage import sha256_file

log = logging.getLogger(__name__)

SCHEMA = "openrelease.run/1"


def write_run_record(runs_dir: Path, stage: str, lineage_file: Path, facts: dict[str, Any]) -> Path:
    """Write `runs_dir/<stage>.json`: `facts` plus the host and the lineage record's sha256."""
    record = {"schema": SCHEMA, "stage": stage, "lineage_sha256": sha256_file(lineage_file),
              "host": platform.node(), **facts}
    return atomic_write_json(Path(runs_dir) / f"{stage}.json", record)


def read_run_records(runs_dir: Path, lineage_dir: Path, stages: list[str],
                     shown: str | None = None) -> tuple[dict[str, dict], list[str]]:
    """Run records of `stages` that belong to the lineage records on disk, and a note per stage without one.

    A run record whose lineage sha256 differs (outputs checked out or pulled from another run) is left
    out and said so: its times and run ids describe other outputs. Notes name the folder as `shown`
    (the params path, never this machine's absolute path: they go into the release manifest).
    """
    runs_dir = Path(runs_dir)
    where = shown or runs_dir.name
    found: dict[str, dict] = {}
    notes: list[str] = []
    for stage in stages:
        path, lineage = runs_dir / f"{stage}.json", Path(lineage_dir) / f"{stage}.json"
        if not path.is_file():
            notes.append(f"{stage}: no run record in {where} (outputs from dvc pull or another workspace)")
            continue
        try:
            rec = read_json(path)
        except (OSError, OpenReleaseError) as e:
            notes.append(f"{stage}: unreadable run record {path.name}: {e}")
            continue
        if not isinstance(rec, dict) or not lineage.is_file() or rec.get("lineage_sha256") != sha256_file(lineage):
            notes.append(f"{stage}: the run record in {where} belongs to another run (lineage sha256 differs)")
            continue
        found[stage] = rec
    return found, notes
