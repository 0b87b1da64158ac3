"""Stage `validate`: check every normalised row with Great Expectations; keep, quarantine or stop.

Reads:  `paths.ingested/rows.jsonl`; params `validate.rows` (rule -> fail | quarantine),
        `validate.max_quarantine_fraction`, `data.sources` (each source's rating scale).
Writes: `paths.validated/rows.parquet` (kept rows, Arrow schema of pipeline.data.formats.common.arrow_schema),
        `paths.validated/quarantine.jsonl` (each set-aside row with its rules and reasons),
        `paths.validated/summary.json` (the accounting `build` folds into metrics/data.json, with ingest's
        takedown exclusions from `paths.ingested/counts.json`), and
        `paths.reports/validation/` (report.json and GX Data Docs at docs/index.html), also on failure.
Run:    `dvc repro validate` (or `python -m pipeline.stages.validate`).

Rules over rows (the pairs suite runs in `build`, on the pairs it makes, before it writes them):
required_fields, text_not_blank, roles_alternate, prompt_ends_with_user, ratings_in_range, unique_ids,
no_control_chars.
Every input row is accounted for: kept (rows.parquet) or quarantined with its rules; rows that
`build` later filters are accounted for there. A `fail` rule with any failing row, or more than
`max_quarantine_fraction` quarantined, exits non-zero naming the source, file:line, rule and an excerpt.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_dir, atomic_write_json, iter_jsonl
from pipeline.core.params import DataSource, RowRules
from pipeline.core.rounds import ROUND_READS
from pipeline.core.stage import StageContext, stage_main
from pipeline.data.formats import rating_range
from pipeline.data.formats.common import arrow_schema, excerpt, rows_to_arrow
from pipeline.data.validation import Outcome, decide, run_suite, stepper

STAGE = "validate"
READS = ["validate.rows", "validate.max_quarantine_fraction", "data.sources", "paths.ingested",
         "paths.validated", "paths.reports"]
REQUIRED = ("id", "source", "source_file", "source_line", "license", "prompt", "completions")
KEPT_FILE, QUARANTINE_FILE, SUMMARY_FILE = "rows.parquet", "quarantine.jsonl", "summary.json"
REPORT_DIR, REPORT_FILE, DOCS_DIR = "validation", "report.json", "docs"
WRITE_BATCH = 5000

log = logging.getLogger(__name__)


def _light(key: str, v: Any) -> Any:
    """A small stand-in for a field (None when missing or of the wrong kind) for the not-null checks."""
    if key in ("prompt", "completions"):
        return len(v) if isinstance(v, list) else None
    if key == "source_line":
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    return v if isinstance(v, str) else None


def _texts(row: dict) -> list[tuple[str, Any]]:
    out = []
    for i, m in enumerate(row.get("prompt") if isinstance(row.get("prompt"), list) else []):
        out.append((f"prompt[{i}].content", m.get("content") if isinstance(m, dict) else None))
    for i, c in enumerate(row.get("completions") if isinstance(row.get("completions"), list) else []):
        c = c if isinstance(c, dict) else {}
        out += [(f"completions[{i}].content", c.get("content")), (f"completions[{i}].generator", c.get("generator"))]
    return out


def _shortest_text(row: dict) -> int:
    """Length of the shortest stripped text (prompt contents, completion contents and generators); 0 when
    one is missing or not a string. The labels of _texts are built only for messages about failures."""
    shortest = None
    prompt, completions = row.get("prompt"), row.get("completions")
    values = [m.get("content") if type(m) is dict else None for m in (prompt if type(prompt) is list else ())]
    for c in completions if type(completions) is list else ():
        values += [c.get("content"), c.get("generator")] if type(c) is dict else [None, None]
    for v in values:
        n = len(v.strip()) if type(v) is str else 0
        if shortest is None or n < shortest:
            shortest = n
            if n == 0:
                break
    return shortest or 0


# C0 and C1 control characters and DEL, except tab and newline; a carriage return only inside CRLF.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")


def control_char(row: dict) -> tuple[str, int, str] | None:
    """(where, char index, U+XXXX) of the first control character in a prompt or completion text."""
    for where, text in _texts(row):
        if isinstance(text, str):
            m = _CONTROL.search(text)
            if m:
                return where, m.start(), f"U+{ord(m.group(0)[0]):04X}"
    return None


def _roles(row: dict) -> list[str]:
    prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
    return [m.get("role") if isinstance(m, dict) and isinstance(m.get("role"), str) else "?" for m in prompt]


def roles_ok(roles: list[str]) -> bool:
    """An optional leading system turn, then user/assistant alternating from user."""
    rest = roles[1:] if roles[:1] == ["system"] else roles
    return bool(rest) and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(rest))


def _ratings(row: dict) -> list[float]:
    vals = []
    for c in row.get("completions") if isinstance(row.get("completions"), list) else []:
        ratings = c.get("ratings") if isinstance(c, dict) else None
        for v in (ratings.values() if isinstance(ratings, dict) else [float("-inf")]):
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            vals.append(float(v) if ok else float("-inf"))  # a non-number is out of any range
    return vals


def _facts_of(row: dict, line: int, cols: dict[str, list]) -> None:
    """Append one row's facts. Only small values are kept (strings that repeat are interned); the
    details a failure message needs are read back from the file for the few rows that fail."""
    for k in REQUIRED:
        v = _light(k, row.get(k))
        cols[k].append(sys.intern(v) if isinstance(v, str) and k != "id" else v)
    cols["line"].append(line)
    cols["text_min_chars"].append(_shortest_text(row) if cols["prompt"][-1] else 0)
    roles = _roles(row)
    cols["roles_ok"].append(roles_ok(roles))
    cols["control_ok"].append(control_char(row) is None)
    cols["last_prompt_role"].append(sys.intern(roles[-1]) if roles else "<none>")
    ratings = _ratings(row)
    cols["rating_min"].append(min(ratings) if ratings else float("nan"))
    cols["rating_max"].append(max(ratings) if ratings else float("nan"))


class RowFetcher:
    """Row i of rows.jsonl again, for messages about the (few) rows that fail: an index of line offsets
    is built on first use, and rows handed over by a pass that already parsed them are reused."""

    def __init__(self, path: Path, lines: list[int]) -> None:
        self.path, self.lines = path, lines
        self._offsets: dict[int, int] | None = None
        self._known: dict[int, dict] = {}

    def put(self, i: int, row: dict) -> None:
        self._known = {i: row}

    def get(self, i: int) -> dict:
        if i in self._known:
            return self._known[i]
        if self._offsets is None:
            self._offsets, pos = {}, 0
            with open(self.path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    self._offsets[n] = pos
                    pos += len(raw)
        with open(self.path, "rb") as f:
            f.seek(self._offsets[self.lines[i]])
            return json.loads(f.readline())


def _to_arrow(batch: list[dict], first: int):
    """Arrow rows of a batch plus a `_row` index column; rows not in the normalised shape are left out
    (they break a rule, so they never reach the kept set) and their indices returned."""
    import pyarrow as pa

    try:
        tables, bad = [rows_to_arrow(batch)], []
    except (KeyError, TypeError, AttributeError, pa.ArrowException):
        tables, bad = [], []
        for i, row in enumerate(batch):
            try:
                tables.append(rows_to_arrow([row]))
            except (KeyError, TypeError, AttributeError, pa.ArrowException):
                bad.append(first + i)
    bad_set = set(bad)
    index = [first + i for i in range(len(batch)) if first + i not in bad_set]
    table = pa.concat_tables(tables) if tables else arrow_schema().empty_table()
    return table.append_column("_row", pa.array(index, pa.int64())), bad


def scan(rows_path: Path, staging: Path) -> tuple[dict[str, list], list[int]]:
    """One pass over rows.jsonl: the facts (column-wise, to keep memory low) and every row as Arrow in
    the `staging` Parquet file. Returns the facts and the rows that could not be put in Arrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {k: [] for k in (*REQUIRED, "line", "text_min_chars", "roles_ok", "last_prompt_role",
                                             "rating_min", "rating_max", "control_ok")}
    unconvertible: list[int] = []
    batch: list[dict] = []
    schema = arrow_schema()
    with pq.ParquetWriter(staging, schema.append(pa.field("_row", pa.int64()))) as writer:
        def flush() -> None:
            table, bad = _to_arrow(batch, len(cols["line"]) - len(batch))
            unconvertible.extend(bad)
            writer.write_table(table)
            batch.clear()

        for line, row in iter_jsonl(rows_path):
            _facts_of(row, line, cols)
            batch.append(row)
            if len(batch) >= WRITE_BATCH:
                flush()
        if batch:
            flush()
    return cols, unconvertible


def expectations(sources: list[DataSource]) -> dict[str, list]:
    """Rule name -> the GX expectations that state it over the facts frame."""
    import great_expectations.expectations as gxe

    rules: dict[str, list] = {
        "required_fields": [gxe.ExpectColumnValuesToNotBeNull(column=k) for k in REQUIRED]
        + [gxe.ExpectColumnValuesToBeInSet(column="source", value_set=[s.name for s in sources])],
        "text_not_blank": [gxe.ExpectColumnValuesToBeBetween(column="text_min_chars", min_value=1)],
        "roles_alternate": [gxe.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True])],
        "prompt_ends_with_user": [gxe.ExpectColumnValuesToBeInSet(column="last_prompt_role", value_set=["user"])],
        "ratings_in_range": [],
        "unique_ids": [gxe.ExpectColumnValuesToBeUnique(column="id")],
        "no_control_chars": [gxe.ExpectColumnValuesToBeInSet(column="control_ok", value_set=[True])],
    }
    for s in sources:
        lo, hi = rating_range(s)
        cond = f'source=="{s.name}"'  # names are [A-Za-z0-9_.-]: safe inside the condition
        for col in ("rating_min", "rating_max"):
            rules["ratings_in_range"].append(gxe.ExpectColumnValuesToBeBetween(
                column=col, min_value=lo, max_value=hi, row_condition=cond, condition_parser="pandas"))
    return rules


def _excerpt(row: dict) -> str:
    prompt = row.get("prompt")
    last = prompt[-1].get("content") if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) else prompt
    return excerpt(last, 60)


def _describer(cols: dict[str, list], fetch: RowFetcher, rows_path: Path, sources: list[DataSource]):
    ranges = {s.name: rating_range(s) for s in sources}
    ids = Counter(cols["id"])

    def describe(i: int, rule: str) -> dict[str, Any]:
        source = cols["source"][i] or "?"
        row = fetch.get(i)
        if rule == "required_fields":
            missing = [k for k in REQUIRED if cols[k][i] is None]
            reason = f"missing or wrong type: {missing}" if missing else f"source {source!r} is not in data.sources"
        elif rule == "text_not_blank":
            blank = next((w for w, t in _texts(row) if not (isinstance(t, str) and t.strip())), "prompt (empty)")
            reason = f"blank text at {blank}"
        elif rule == "roles_alternate":
            reason = f"prompt roles [{','.join(_roles(row))}] do not alternate user/assistant from user"
        elif rule == "prompt_ends_with_user":
            reason = f"prompt ends with {cols['last_prompt_role'][i]!r}, not a user turn"
        elif rule == "ratings_in_range":
            lo, hi = ranges.get(source, (None, None))
            reason = f"ratings span [{cols['rating_min'][i]}, {cols['rating_max'][i]}] outside [{lo}, {hi}]"
        elif rule == "unique_ids":
            reason = f"id {cols['id'][i]!r} appears {ids[cols['id'][i]]} times"
        elif rule == "no_control_chars":
            where, at, code = control_char(row) or ("?", -1, "?")
            reason = f"control character {code} in {where} at char {at}"
        else:
            reason = rule
        located = cols["source_file"][i] is not None and cols["source_line"][i] is not None
        return {"source": source, "id": cols["id"][i], "reason": reason, "excerpt": _excerpt(row),
                "path": cols["source_file"][i] if located else str(rows_path),
                "where": cols["source_line"][i] if located else cols["line"][i],
                "ingested_line": cols["line"][i]}

    return describe


def check(cols: dict[str, list], rows_path: Path, sources: list[DataSource], rules: RowRules,
          max_fraction: float, report_dir: Path | None, report_name: str = REPORT_FILE, asset: str | None = None):
    """Run the rows suite over the facts; write report.json (+ Data Docs naming the data asset `asset`,
    default the rows file's name) into `report_dir`. Bad rows
    raise nothing here: the Outcome carries the error, so the report is written before the stage stops.
    Returns the Outcome, its `describe(i, rule)` and the RowFetcher behind it."""
    import pandas as pd

    frame = pd.DataFrame(cols)
    asset = asset or rows_path.name
    actions = rules.model_dump()
    results = run_suite("rows", frame, expectations(sources), actions,
                        docs_dir=report_dir / DOCS_DIR if report_dir else None, asset=asset)
    fetch = RowFetcher(rows_path, cols["line"])
    describe = _describer(cols, fetch, rows_path, sources)
    outcome = decide(results, len(frame), max_fraction, describe, report_name)
    by_source: dict[str, dict[str, int]] = {}
    for i, s in enumerate(cols["source"]):
        b = by_source.setdefault(s or "?", {"rows": 0, "kept": 0, "quarantined": 0})
        b["rows"] += 1
        b["quarantined" if i in outcome.quarantined else "kept"] += 1
    outcome.report["by_source"] = by_source
    outcome.report["quarantined_by_rule"] = {r: len(v.failed) for r, v in results.items() if v.action == "quarantine"}
    if report_dir is not None:
        outcome.report["data_docs"] = f"{DOCS_DIR}/index.html"
        atomic_write_json(report_dir / REPORT_FILE, outcome.report)
    return outcome, describe, fetch


def write_outputs(rows_path: Path, staging: Path, outcome: Outcome, unconvertible: list[int], describe,
                  fetch: RowFetcher, out_dir: Path) -> dict:
    """Kept rows: the staged Arrow rows minus the quarantined ones, to Parquet batch by batch.
    Quarantined rows: their original JSON lines, with rules and reasons."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n = outcome.report["input_rows"]
    stray = [i for i in unconvertible if i not in outcome.quarantined]
    if stray:  # every rule passed but the row is not in the normalised shape: a gap in the rules
        d = describe(stray[0], "normalised shape")
        raise DataError(d["path"], d["where"], f"[{d['source']}] normalised row shape",
                        f"fields have the wrong types: {d['excerpt']}")
    drop = np.zeros(n, dtype=bool)
    drop[list(outcome.quarantined)] = True
    keep = pa.array(~drop)
    with pq.ParquetWriter(out_dir / KEPT_FILE, arrow_schema()) as writer:
        for batch in pq.ParquetFile(staging).iter_batches(batch_size=WRITE_BATCH):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.take(keep, table.column("_row")))
            writer.write_table(table.drop_columns(["_row"]))
    with open(out_dir / QUARANTINE_FILE, "w", encoding="utf-8", newline="\n") as qf:
        if outcome.quarantined:
            for i, (_, row) in enumerate(iter_jsonl(rows_path)):
                rules = outcome.quarantined.get(i)
                if rules:
                    fetch.put(i, row)
                    d = describe(i, rules[0])
                    entry = {"rules": rules, "reasons": {r: describe(i, r)["reason"] for r in rules},
                             "where": f"{d['path']}:{d['where']}", "row": row}
                    qf.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
    summary = {k: outcome.report[k] for k in ("input_rows", "kept", "quarantined")}
    summary["quarantined_by_rule"] = outcome.report["quarantined_by_rule"]
    summary["by_source"] = outcome.report["by_source"]
    summary["excluded"] = ingest_exclusions(rows_path)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def ingest_exclusions(rows_path: Path) -> dict[str, int]:
    """Records ingest dropped before any row existed (takedowns), from its counts.json beside rows.jsonl, so
    build can account for them in metrics/data.json: {"takedown": n, "takedown.<source>": n}."""
    counts = rows_path.parent / "counts.json"
    try:
        excluded = (json.loads(counts.read_text(encoding="utf-8")).get("excluded") or {}) if counts.is_file() else {}
    except ValueError:
        raise DataError(counts, None, "valid JSON (ingest's counts)", "unreadable") from None
    out = {"takedown": int(excluded.get("takedown", 0))}
    out.update({f"takedown.{k}": int(n) for k, n in sorted((excluded.get("by_source") or {}).items())})
    return out


def run(rows_path: Path, sources: list[DataSource], rules: RowRules, max_fraction: float, out_dir: Path,
        report_dir: Path | None = None, report_name: str = REPORT_FILE, asset: str | None = None) -> dict:
    """Validate rows.jsonl into `out_dir` (kept, quarantined, summary); the report goes to `report_dir`
    (replaced, and kept when validation fails). Raises DataError on failure, after the report."""
    step = stepper("validate")
    staging = out_dir / ".staging.parquet"
    cols, unconvertible = scan(rows_path, staging)
    step(f"read {len(cols['line'])} rows")
    if report_dir is not None:
        shutil.rmtree(report_dir, ignore_errors=True)
        report_dir.mkdir(parents=True)
    outcome, describe, fetch = check(cols, rows_path, sources, rules, max_fraction, report_dir, report_name, asset)
    step(f"rows suite done: {outcome.report['quarantined']} quarantined")
    if outcome.error is not None:
        staging.unlink(missing_ok=True)
        raise outcome.error
    summary = write_outputs(rows_path, staging, outcome, unconvertible, describe, fetch, out_dir)
    staging.unlink()
    step("wrote kept and quarantined rows")
    return summary


def _body(ctx: StageContext) -> None:
    from pipeline.data.formats.common import ROWS_FILE

    p = ctx.params
    rows_path = ctx.path("ingested") / ROWS_FILE
    ctx.add_input(rows_path, name="ingested")
    report_dir = ctx.path("reports") / REPORT_DIR
    out = ctx.path("validated")
    try:
        with atomic_dir(out) as tmp:
            summary = run(rows_path, p.data.sources, p.validate_.rows, p.validate_.max_quarantine_fraction, tmp,
                          report_dir, f"{p.paths.reports}/{REPORT_DIR}/{REPORT_FILE}",
                          asset=f"{p.paths.ingested}/{ROWS_FILE}")
    finally:
        if (report_dir / REPORT_FILE).exists():
            ctx.run.log_artifact(report_dir / REPORT_FILE, artifact_path="validation")
    ctx.add_output(out, rows=summary["kept"])
    ctx.add_output(report_dir)
    ctx.record.extra["validation"] = summary
    ctx.log_metrics({"rows": summary["input_rows"], "kept": summary["kept"], "quarantined": summary["quarantined"]})
    log.info("validate: %d rows, %d kept, %d quarantined", summary["input_rows"], summary["kept"],
             summary["quarantined"])


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage validate_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "validate_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
