"""Stage `ingest`: read every configured preference source into one normalised schema.

Reads:  params `data.sources` (name, format, path, license, split, max_rows, weight, sha256), the files
        they name (the default: the on-policy rows at `${paths.rated}`), or hf:// datasets.
Writes: `paths.ingested/rows.jsonl` (one normalised prompt group per line, see pipeline/data/formats/common.py)
        and `paths.ingested/counts.json` (rows and completions per source, with each file's sha256);
        every source file is logged as an MLflow dataset input with its sha256.
Run:    `dvc repro ingest` (or `python -m pipeline.stages.ingest`).

A source `path` may be `${paths.<key>}`, resolved from params `paths`. DVC tracks the default on-policy
file as a dependency; any other local source is tracked through params (its path, and its `sha256`
when pinned: ingest refuses a file whose sha256 differs, and a new sha256 is a params change that
reruns the stage) and through the sha256 recorded in lineage and MLflow. dvc.yaml cannot list a
params list as deps (DVC 3.67 interpolates lists only in `foreach`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError, ParamsError, SourceError
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.lineage import sha256_file
from pipeline.core.params import DataParams, DataSource, Paths
from pipeline.core.stage import StageContext, stage_main
from pipeline.data.formats import READERS
from pipeline.data.formats.common import ROWS_FILE

STAGE = "ingest"
READS = ["data.sources", "paths.rated", "paths.ingested"]
COUNTS_FILE = "counts.json"
_REF = re.compile(r"\$\{paths\.([A-Za-z_][A-Za-z0-9_]*)\}")

log = logging.getLogger(__name__)


def expand_path(path: str, paths: Paths) -> str:
    """Expand `${paths.<key>}` references; nothing else is interpolated."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in Paths.model_fields:
            raise ParamsError(f"data.sources path {path!r}: unknown reference paths.{m.group(1)}")
        return getattr(paths, m.group(1))

    expanded = _REF.sub(sub, path)
    if "${" in expanded:
        raise ParamsError(f"data.sources path {path!r}: only ${{paths.<key>}} references are allowed")
    return expanded


def resolve_path(path: str, root: Path) -> str:
    """A local path relative to `root` made absolute; hf:// paths pass through."""
    if path.startswith("hf://") or Path(path).is_absolute():
        return path
    return str(root / path)


def ingest_source(source: DataSource, path: str, out, stats: dict[str, Any]) -> None:
    """Stream one source's normalised rows into the open file `out`, counting into `stats`.

    `source_file` is recorded as params name it (stats["path"]), so provenance does not depend on
    where the checkout lives.
    """
    reader = READERS[source.format]
    if not path.startswith("hf://"):
        if not Path(path).is_file():
            raise SourceError(f"data.sources[{source.name}]: {path} does not exist")
        stats["sha256"] = sha256_file(path)
        if source.sha256 is not None and stats["sha256"] != source.sha256:
            raise SourceError(f"data.sources[{source.name}]: {path} has sha256 {stats['sha256']}, "
                              f"params pin {source.sha256}")
    rows = reader(path, source)
    if source.max_rows is not None:
        rows = itertools.islice(rows, source.max_rows)
    n = completions = 0
    for row in rows:
        row["source_file"] = stats["path"]
        out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        n += 1
        completions += len(row["completions"])
    if n == 0:
        raise DataError(path, None, f"[{source.name}] source has rows", "no rows were read")
    stats.update(rows=n, completions=completions,
                 max_rows_reached=source.max_rows is not None and n == source.max_rows)


def run(data: DataParams, paths: Paths, out_dir: Path, root: Path) -> dict[str, Any]:
    """Write rows.jsonl and counts.json into `out_dir`; return the counts."""
    counts: dict[str, Any] = {"sources": {}}
    with open(out_dir / ROWS_FILE, "w", encoding="utf-8", newline="\n") as out:
        for source in data.sources:
            written = expand_path(source.path, paths)
            path = resolve_path(written, root)
            stats: dict[str, Any] = {"format": source.format, "path": written,
                                     "license": source.license, "sha256": None}
            log.info("reading source %s (%s) from %s", source.name, source.format, stats["path"])
            ingest_source(source, path, out, stats)
            counts["sources"][source.name] = stats
            log.info("source %s: %d rows, %d completions", source.name, stats["rows"], stats["completions"])
    counts["rows"] = sum(s["rows"] for s in counts["sources"].values())
    counts["completions"] = sum(s["completions"] for s in counts["sources"].values())
    atomic_write_json(out_dir / COUNTS_FILE, counts)
    return counts


def _body(ctx: StageContext) -> None:
    out = ctx.path("ingested")
    with atomic_dir(out) as tmp:
        counts = run(ctx.params.data, ctx.params.paths, tmp, ctx.root)
    for name, s in counts["sources"].items():
        if s["sha256"] is not None:
            ctx.add_input(resolve_path(s["path"], ctx.root), rows=s["rows"], name=name)
        else:  # a Hub dataset: the pinned commit is its identity
            ctx.record.extra.setdefault("hub_sources", {})[name] = s["path"]
    ctx.add_output(out, rows=counts["rows"])
    ctx.record.extra["counts"] = counts
    ctx.log_metrics({"rows": counts["rows"], "completions": counts["completions"],
                     **{f"rows.{k}": v["rows"] for k, v in counts["sources"].items()}})


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
