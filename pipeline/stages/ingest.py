"""Stages `ingest_source@<i>` and `ingest`: read each configured preference source into one normalised
schema, then merge them in params order.

Reads:  params `data.sources` (name, format, path, license, split, max_rows, weight, sha256) and the file
        each names: a local file, the on-policy rows (`paths.rated`, written by `rate`), or a Hub pointer
        file `*.hub.json` ({"dataset": "<id>", "revision": "<40-hex commit>"}, fetched with `datasets`).
Writes: per source (`python -m pipeline.stages.ingest --source NAME`, the DVC foreach stage
        `ingest_source@<index>`): `paths.ingested_sources/<name>/{rows.jsonl,counts.json}`;
        merged (`python -m pipeline.stages.ingest`, stage `ingest`): `paths.ingested/rows.jsonl` (one
        normalised prompt group per line, see pipeline/data/formats/common.py) and `counts.json` (rows and
        completions per source, with each file's sha256); every source file is an MLflow dataset input.
Run:    `dvc repro ingest`.

Takedowns (`paths.takedowns`, pipeline.data.takedowns): each source stage drops the raw records whose
record_sha256 the file lists before its reader parses them, and records how many each hash matched;
the merge refuses a source ingested under another takedown list, warns about hashes that matched no
record in any source, and reports the total as `excluded.takedown` (validate carries it into its
summary, build into metrics/data.json). The file is a DVC dependency of every ingest stage, so a new
entry invalidates ingest and everything below it (`dvc status` shows which).

Each source's file is a DVC dependency of its own stage, so editing it reruns that stage (and only the
stages below it). A source whose path is `paths.rated` (write it as the YAML alias `*rated`: DVC does
not interpolate inside params values) makes its stage depend on `rate`; without one, `dvc repro
<stage>` never runs `generate` or `rate`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError, ParamsError, SourceError
from pipeline.core.imports import stage_code
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.lineage import sha256_file
from pipeline.core.params import DataParams, DataSource, Paths
from pipeline.core.rounds import ROUND_READS
from pipeline.core.stage import StageContext, stage_main
from pipeline.data.formats import READERS
from pipeline.data.formats.common import ROWS_FILE
from pipeline.data.takedowns import Takedown, TakedownFilter, file_digest, load_takedowns, warn_unmatched

STAGE = "ingest"
READS = ["data.sources", "paths.ingested_sources", "paths.ingested", "paths.takedowns"]
SOURCE_STAGE = "ingest_source"
SOURCE_READS = ["data.sources", "paths.ingested_sources", "paths.takedowns"]
ROUND_STAGE = "ingest_round"  # round k >= 2 of iterative DPO: its on-policy source, read and merged in one stage
DVC_STAGES = {STAGE: READS, SOURCE_STAGE: SOURCE_READS, ROUND_STAGE: [*READS, *ROUND_READS]}  # dvc.yaml stage -> params read
COUNTS_FILE = "counts.json"

log = logging.getLogger(__name__)


def resolve_path(path: str, root: Path) -> str:
    """A local path relative to `root` made absolute; hf:// paths pass through."""
    if path.startswith("hf://") or Path(path).is_absolute():
        return path
    return str(root / path)


def ingest_source(source: DataSource, path: str, out, stats: dict[str, Any],
                  takedowns: list[Takedown] | None = None) -> None:
    """Stream one source's normalised rows into the open file `out`, counting into `stats`; records
    `takedowns` name are dropped (stats["takedowns"] says how many each matched).

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
        if path.endswith(HUB_POINTER):
            stats["hub"] = path = hub_url(Path(path))
    exclude = TakedownFilter(takedowns or [])
    rows = reader(path, source, exclude)
    if source.max_rows is not None:
        rows = itertools.islice(rows, source.max_rows)
    n = completions = 0
    for row in rows:
        row["source_file"] = stats["path"]
        out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        n += 1
        completions += len(row["completions"])
    stats["takedowns"] = {"digest": file_digest(takedowns or []), "excluded": exclude.excluded,
                          "matched": dict(sorted(exclude.matched.items()))}
    if n == 0 and exclude.excluded:  # a takedown may empty a source; that must not block the takedown
        log.warning("source %s: every record read was taken down (%d)", source.name, exclude.excluded)
    elif n == 0:
        raise DataError(path, None, f"[{source.name}] source has rows", "no rows were read")
    stats.update(rows=n, completions=completions,
                 max_rows_reached=source.max_rows is not None and n == source.max_rows)


HUB_POINTER = ".hub.json"


def hub_url(pointer: Path) -> str:
    """`hf://datasets/<id>@<commit>` from a pointer file {"dataset": "<id>", "revision": "<40-hex commit>"}:
    a local file DVC can track that pins a Hub dataset (DVC cannot depend on hf:// URLs)."""
    from pipeline.core.io import read_json
    from pipeline.core.params.base import HF_DATASET

    spec = read_json(pointer)
    url = f"hf://datasets/{spec.get('dataset')}@{spec.get('revision')}" if isinstance(spec, dict) else ""
    if not re.fullmatch(HF_DATASET, url):
        raise DataError(pointer, None, "Hub pointer {dataset: <namespace>/<name>, revision: <40-hex commit>}",
                        f"got {spec!r:.120}")
    return url


def _source(data: DataParams, name: str) -> DataSource:
    for s in data.sources:
        if s.name == name:
            return s
    raise ParamsError(f"data.sources: no source named {name!r} (have {[s.name for s in data.sources]})")


def run_source(source: DataSource, out_dir: Path, root: Path, takedowns: list[Takedown] | None = None) -> dict[str, Any]:
    """One source into `out_dir/rows.jsonl` and `counts.json` (the foreach stage `ingest_source`)."""
    written = source.path  # as params name it, so provenance does not depend on where the checkout lives
    stats: dict[str, Any] = {"format": source.format, "path": written, "license": source.license, "sha256": None,
                             "params": source.model_dump(mode="json")}
    log.info("reading source %s (%s) from %s", source.name, source.format, written)
    with open(out_dir / ROWS_FILE, "w", encoding="utf-8", newline="\n") as out:
        ingest_source(source, resolve_path(written, root), out, stats, takedowns)
    log.info("source %s: %d rows, %d completions, %d record(s) taken down", source.name, stats["rows"],
             stats["completions"], stats["takedowns"]["excluded"])
    atomic_write_json(out_dir / COUNTS_FILE, stats)
    return stats


def merge(data: DataParams, sources_dir: Path, out_dir: Path, takedowns: list[Takedown] | None = None,
          takedowns_shown: str = "takedowns") -> dict[str, Any]:
    """Concatenate the per-source outputs in params order into `out_dir` (the `ingest` stage).

    A per-source folder made for other source params or another takedown list (run outside DVC, or
    stale) is refused."""
    import shutil
    from collections import Counter

    takedowns = takedowns or []
    digest, matched = file_digest(takedowns), Counter()
    counts: dict[str, Any] = {"sources": {}}
    with open(out_dir / ROWS_FILE, "wb") as out:
        for source in data.sources:
            folder = sources_dir / source.name
            try:
                stats = json.loads((folder / COUNTS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise SourceError(f"data.sources[{source.name}]: no ingested rows in {folder} "
                                  "(run `dvc repro ingest`)") from None
            if stats.pop("params", None) != source.model_dump(mode="json"):
                raise SourceError(f"data.sources[{source.name}]: {folder} was ingested with other source params "
                                  "(run `dvc repro ingest`)")
            applied = stats.get("takedowns") or {}
            if applied.get("digest") != digest:
                raise SourceError(f"data.sources[{source.name}]: {folder} was ingested under another takedown list "
                                  f"than {takedowns_shown} (run `dvc repro ingest`)")
            matched.update(applied.get("matched") or {})
            with open(folder / ROWS_FILE, "rb") as f:
                shutil.copyfileobj(f, out)
            counts["sources"][source.name] = stats
    counts["rows"] = sum(s["rows"] for s in counts["sources"].values())
    counts["completions"] = sum(s["completions"] for s in counts["sources"].values())
    unmatched = warn_unmatched(takedowns, matched, takedowns_shown)
    # What a release may say about the removals: hashes, reasons and counts, never content.
    counts["excluded"] = {"takedown": sum(matched.values()),
                          "by_source": {k: s["takedowns"]["excluded"] for k, s in counts["sources"].items()}}
    counts["takedowns"] = [{**t.public(), "matched": matched.get(t.sha256, 0)} for t in takedowns]
    counts["takedowns_unmatched"] = len(unmatched)
    atomic_write_json(out_dir / COUNTS_FILE, counts)
    return counts


def takedowns_of(paths: Paths | None, root: Path) -> tuple[list[Takedown], str]:
    """The takedown entries of `paths.takedowns` (none without paths or file) and the path as params name it."""
    if paths is None:
        return [], "takedowns"
    shown = paths.takedowns
    return load_takedowns(Path(resolve_path(shown, root)), shown), shown


def run(data: DataParams, paths: Paths | None, out_dir: Path, root: Path) -> dict[str, Any]:
    """Every source, then the merge, in one process (what the DVC stages do one by one); return the counts.

    `paths` gives the takedown file (`paths.takedowns`); None: no takedowns."""
    import tempfile

    takedowns, shown = takedowns_of(paths, root)
    with tempfile.TemporaryDirectory(prefix=".ingest-sources-", dir=out_dir.parent) as tmp:
        for source in data.sources:
            (Path(tmp) / source.name).mkdir()
            run_source(source, Path(tmp) / source.name, root, takedowns)
        return merge(data, Path(tmp), out_dir, takedowns, shown)


def _source_body(name: str):
    def body(ctx: StageContext) -> None:
        # the record is named ingest_source.<name>, which names no module: its code is this module's
        ctx.record.code = stage_code("pipeline.stages.ingest")
        source = _source(ctx.params.data, name)
        takedowns, shown = takedowns_of(ctx.params.paths, ctx.root)
        out = ctx.path("ingested_sources") / name
        with atomic_dir(out) as tmp:
            stats = run_source(source, tmp, ctx.root, takedowns)
        if (ctx.root / shown).is_file():
            ctx.add_input(ctx.root / shown, rows=len(takedowns), name="takedowns")
        if stats["sha256"] is not None:
            ctx.add_input(resolve_path(stats["path"], ctx.root), rows=stats["rows"], name=name)
        ctx.add_output(out, rows=stats["rows"])
        ctx.record.extra["counts"] = {k: v for k, v in stats.items() if k != "params"}
        ctx.log_metrics({"rows": stats["rows"], "completions": stats["completions"]})

    return body


def _body(ctx: StageContext) -> None:
    out = ctx.path("ingested")
    takedowns, shown = takedowns_of(ctx.params.paths, ctx.root)
    with atomic_dir(out) as tmp:
        counts = merge(ctx.params.data, ctx.path("ingested_sources"), tmp, takedowns, shown)
    if (ctx.root / shown).is_file():
        ctx.add_input(ctx.root / shown, rows=len(takedowns), name="takedowns")
    # the release's manifest and cards read the applied takedowns from this record
    ctx.record.extra["takedowns"] = counts["takedowns"]
    for name, s in counts["sources"].items():
        if s["sha256"] is not None:
            ctx.add_input(resolve_path(s["path"], ctx.root), rows=s["rows"], name=name)
        if s.get("hub") or s["sha256"] is None:  # a Hub dataset: the pinned commit is its identity
            ctx.record.extra.setdefault("hub_sources", {})[name] = s.get("hub") or s["path"]
    ctx.add_output(out, rows=counts["rows"])
    ctx.record.extra["counts"] = counts
    ctx.log_metrics({"rows": counts["rows"], "completions": counts["completions"],
                     "excluded.takedown": counts["excluded"]["takedown"],
                     **{f"rows.{k}": v["rows"] for k, v in counts["sources"].items()}})


def _round_body(ctx: StageContext) -> None:
    """A later round (pipeline.core.rounds): data.sources is the round's own on-policy source, read and
    merged here in one process (`run`), under the same takedowns."""
    out = ctx.path("ingested")
    with atomic_dir(out) as tmp:
        counts = run(ctx.params.data, ctx.params.paths, tmp, ctx.root)
    takedowns, shown = takedowns_of(ctx.params.paths, ctx.root)
    if (ctx.root / shown).is_file():
        ctx.add_input(ctx.root / shown, rows=len(takedowns), name="takedowns")
    ctx.record.extra["takedowns"] = counts["takedowns"]
    for name, s in counts["sources"].items():
        ctx.add_input(resolve_path(s["path"], ctx.root), rows=s["rows"], name=name)
    ctx.add_output(out, rows=counts["rows"])
    ctx.record.extra["counts"] = counts
    ctx.log_metrics({"rows": counts["rows"], "completions": counts["completions"],
                     "excluded.takedown": counts["excluded"]["takedown"]})


def main() -> None:
    import sys

    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _round_body))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--source":
        stage_main(f"{SOURCE_STAGE}.{sys.argv[2]}", SOURCE_READS, _source_body(sys.argv[2]))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
