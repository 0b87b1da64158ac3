"""The Great Expectations Data Docs in a release, with the validation's real run time.

The validate stage (rows) and the build stage (pairs) write Data Docs under `paths.reports/<kind>/docs/`,
already made offline (pipeline.data.datadocs). Those folders are DVC outputs, so GX's run time in them
is fixed at 1970-01-01T00:00:00Z (content-hashed outputs hold no volatile facts). The release is not
content-hashed: its copy, `dataset/reports/data_docs/<kind>/`, shows the time the stage that ran the
suite started (its run record, pipeline.core.runs), and says so where a run record is missing. The
manifest lists and hashes every copied file like any other, and the audit checks that no page in the
release loads anything from the network.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

# report folder -> the stage whose run validated it
DOCS = {"validation": "validate", "pairs_validation": "build"}
BUNDLE_DIR = ("reports", "data_docs")
_EPOCH_ISO, _EPOCH_INDEX, _EPOCH_SORT = "1970-01-01T00:00:00Z", "1970-01-01 00:00:00 UTC", "'_run_time_sort': 0.0"
_LOAD_TIME = "(time: see the run record)"


def _when(run: dict[str, Any] | None) -> datetime | None:
    try:
        return datetime.fromisoformat(str((run or {}).get("started_at")))
    except ValueError:
        return None


def fill_run_time(page: str, stage: str, run: dict[str, Any] | None) -> str:
    """A Data Docs page with GX's fixed run time replaced by the stage run's start (or a note)."""
    start = _when(run)
    if start is None:
        missing = f"not recorded (no run record of stage {stage})"
        return page.replace(_EPOCH_ISO, missing).replace(_EPOCH_INDEX, missing).replace(_LOAD_TIME, missing)
    end = _when({"started_at": (run or {}).get("finished_at")})
    span = f"during stage {stage}'s run, {start:%Y-%m-%d %H:%M:%S}" + (f" to {end:%H:%M:%S} UTC" if end else " UTC")
    return (page.replace(_EPOCH_ISO, f"{start:%Y-%m-%dT%H:%M:%SZ}")
            .replace(_EPOCH_INDEX, f"{start:%Y-%m-%d %H:%M:%S} UTC")
            .replace(_EPOCH_SORT, f"'_run_time_sort': {start.timestamp()!r}")
            .replace(_LOAD_TIME, span))


def copy_into(reports: Path, dataset: Path, runs: dict[str, dict[str, Any]]) -> list[str]:
    """Copy each Data Docs site under `reports` into the dataset folder with run times filled in; return
    the copied sites' index pages relative to `dataset`."""
    out = []
    for kind, stage in DOCS.items():
        src = Path(reports) / kind / "docs"
        if not (src / "index.html").is_file():
            continue
        dest = dataset.joinpath(*BUNDLE_DIR, kind)
        shutil.copytree(src, dest)
        for page in dest.rglob("*.html"):
            text = page.read_text(encoding="utf-8")
            filled = fill_run_time(text, stage, runs.get(stage))
            if filled != text:
                page.write_text(filled, encoding="utf-8")
        out.append((dest / "index.html").relative_to(dataset).as_posix())
    return out
