"""Running validation rules through Great Expectations 1.x, and what to do with the rows that fail.

A *rule* (a params key such as `roles_alternate`) is one or more GX expectations over a pandas frame
of per-row facts: the frame has one row per data row, holding light projections of its fields
(an id, a count, a role) and, where no built-in expectation can state the rule directly, a computed
column (`roles_ok`, `tokens_max`, ...) that a built-in expectation then checks. Every rule therefore
runs through GX, appears in the Data Docs, and its failing rows come from GX's own
`unexpected_index_list`. Each rule's action (fail | quarantine) comes from params.

GX runs in an ephemeral context (nothing written but the Data Docs site we ask for).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError

log = logging.getLogger(__name__)
# The run time GX shows in the Data Docs: a fixed one, since the docs are a content-hashed DVC output
# (the stage's real start time is in its run record, pipeline.core.runs; the release's copy of the docs
# shows that time instead: pipeline.release.datadocs).
DOCS_RUN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
# GX stamps the logo URL of every page with the render time (`?d=<timestamp>`), shows the batch load
# time, and gives collapsible blocks random uuid4 ids: none of it describes the data.
_STAMP = re.compile(rb"\?d=\d{8}T\d{6}\.\d+Z")
_TIME = re.compile(rb"\d{8}T\d{6}\.\d{6}Z")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
EXAMPLES_PER_RULE = 5


def stepper(stage: str):
    """A function that logs (INFO) a finished step with the elapsed time and current resident memory."""
    import psutil

    t0, proc, logger = time.monotonic(), psutil.Process(), logging.getLogger(f"pipeline.stages.{stage}")

    def step(what: str) -> None:
        logger.info("%s (%.1fs, RSS %.0f MB)", what, time.monotonic() - t0, proc.memory_info().rss / 2**20)
    return step


@dataclass
class RuleResult:
    rule: str
    action: str
    failed: list[int]  # frame indices, sorted
    expectations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failed


def run_suite(name: str, frame, expectations: dict[str, list], actions: dict[str, str],
              docs_dir: Path | None = None, asset: str | None = None) -> dict[str, RuleResult]:
    """Validate `frame` against `expectations` (rule -> GX expectations); return each rule's failing indices.

    With `docs_dir`, a Data Docs site (index.html) for this suite is built there, naming the data asset
    `asset` (default: `name`), and made to render offline (pipeline.data.datadocs).
    """
    # GX logs its plugin registration at INFO, hundreds of lines per run.
    logging.getLogger("great_expectations").setLevel(max(logging.WARNING, logging.getLogger().level))
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    t0 = time.monotonic()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="local", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    batch_def = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
                 .add_batch_definition_whole_dataframe(name))
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for rule, exps in expectations.items():
        for exp in exps:
            exp.meta = {**(exp.meta or {}), "rule": rule, "action": actions[rule]}
            suite.add_expectation(exp)
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[vd], actions=[],
        result_format={"result_format": "COMPLETE"}))
    # A fixed run identity: GX otherwise names folders and pages after the wall-clock time, and the
    # Data Docs are a DVC output whose hash must not change between two runs of the same data.
    from great_expectations.core.run_identifier import RunIdentifier

    outcome = checkpoint.run(batch_parameters={"dataframe": frame},
                             run_id=RunIdentifier(run_name=name, run_time=DOCS_RUN_TIME))
    if docs_dir is not None:
        _write_docs(context, outcome, docs_dir, asset or name)
    results = {rule: RuleResult(rule, actions[rule], []) for rule in expectations}
    failed: dict[str, set[int]] = {rule: set() for rule in expectations}
    for run_result in outcome.run_results.values():
        for r in run_result.results:
            cfg = r.expectation_config
            rule = cfg.meta["rule"]
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"GX expectation {cfg.type} for rule {rule} raised: "
                                   f"{r.exception_info.get('exception_message')}")
            idx = r.result.get("unexpected_index_list") or []
            failed[rule].update(int(i) for i in idx)
            if not r.success and not idx:  # a table-level expectation: the whole table fails
                failed[rule].update(range(len(frame)))
            results[rule].expectations.append({
                "type": cfg.type, "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
                "success": bool(r.success), "unexpected_count": r.result.get("unexpected_count"),
            })
    for rule, idx in failed.items():
        results[rule].failed = sorted(idx)
    log.info("GX suite %s: %d rules over %d rows in %.1fs", name, len(expectations), len(frame),
             time.monotonic() - t0)
    return results


def _write_docs(context, outcome, docs_dir: Path, asset: str) -> None:
    """Build the Data Docs after the run: a dataframe batch carries no data asset name (the pages would
    say "Data asset: None"), so the stored results get one first. Then pages are made reproducible and
    offline."""
    import great_expectations as gx

    from pipeline.data.datadocs import make_offline

    for key, result in outcome.run_results.items():
        result.meta.setdefault("batch_spec", {})["data_asset_name"] = asset
        context.validation_results_store.set(key, result)
    gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"]).run(outcome)
    _unstamp(docs_dir)
    make_offline(docs_dir)


def _unstamp(docs_dir: Path) -> None:
    """Drop the render-time query GX appends to asset URLs, so the same data gives the same pages."""
    fixed = DOCS_RUN_TIME.strftime("%Y%m%dT%H%M%S.%fZ").encode()
    for page in Path(docs_dir).rglob("*.html"):
        data = page.read_bytes()
        ids: dict[bytes, bytes] = {}
        clean = _STAMP.sub(b"", data)
        clean = _TIME.sub(lambda m: m.group(0) if m.group(0) == fixed else b"(time: see the run record)", clean)
        clean = _UUID.sub(lambda m, ids=ids: ids.setdefault(m.group(0), b"id%d" % len(ids)), clean)
        if clean != data:
            page.write_bytes(clean)


@dataclass
class Outcome:
    """What a suite decided for every row: the rules each quarantined row broke, and any fatal error."""

    report: dict[str, Any]
    quarantined: dict[int, list[str]]  # frame index -> rules
    error: DataError | None
    truncated: list[int] = field(default_factory=list)  # kept longer than max_length (token_length: truncate)


def decide(results: dict[str, RuleResult], n_rows: int, max_fraction: float,
           describe: Callable[[int, str], dict[str, Any]], report_path: str, unit: str = "rows") -> Outcome:
    """Apply each rule's action. `describe(index, rule)` gives {path, where, source, reason, excerpt}
    for a failing row (used for the examples in the report and the error message)."""
    quarantined: dict[int, list[str]] = {}
    rules_report: dict[str, Any] = {}
    fatal: list[tuple[str, int]] = []
    for rule, res in results.items():
        examples = [describe(i, rule) for i in res.failed[:EXAMPLES_PER_RULE]]
        rules_report[rule] = {"action": res.action, "success": res.success, "failed_rows": len(res.failed),
                              "expectations": res.expectations, "examples": examples}
        if res.failed and res.action == "fail":
            fatal.append((rule, res.failed[0]))
        elif res.failed:
            for i in res.failed:
                quarantined.setdefault(i, []).append(rule)
    fraction = len(quarantined) / n_rows if n_rows else 0.0
    error = None
    if fatal:
        rule, i = fatal[0]
        d = describe(i, rule)
        more = f"; {len(fatal) - 1} more failing rule(s)" if len(fatal) > 1 else ""
        error = DataError(d["path"], d["where"], f"[{d['source']}] {rule}",
                          f"{d['reason']}: {d['excerpt']} ({len(results[rule].failed)} {unit[:-1]}(s) break this rule"
                          f"{more}; see {report_path})")
    elif fraction > max_fraction:
        worst = max((r for r in results.values() if r.action == "quarantine"), key=lambda r: len(r.failed))
        error = DataError(report_path, None, "max_quarantine_fraction",
                          f"{len(quarantined)} of {n_rows} {unit} quarantined ({fraction:.1%}) > "
                          f"{max_fraction:.1%}; most by rule {worst.rule} ({len(worst.failed)})")
    report = {
        "status": "failed" if error else "passed", "error": str(error) if error else None,
        "input_rows": n_rows, "kept": n_rows - len(quarantined), "quarantined": len(quarantined),
        "quarantine_fraction": fraction, "max_quarantine_fraction": max_fraction, "rules": rules_report,
    }
    return Outcome(report, quarantined, error)
