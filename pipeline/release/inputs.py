"""Everything a release is made from, read robustly from the pipeline's outputs.

The stages before `card` are built by other modules; this reads their documented outputs (lineage
records, dvc.lock, metrics, plots, reports, the model folder and the Parquet splits) and never invents
a number: whatever is missing stays None and the cards show it as missing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import DataError, SourceError
from pipeline.core.io import read_json
from pipeline.core.params import Params

log = logging.getLogger(__name__)

METRIC_FILES = ("eval", "data", "train")
# Parquet tables of paths.dataset that are not preference splits: each is published as its own config.
SIDE_TABLES = ("provenance",)
EVAL_SET_SUFFIXES = (".jsonl", ".json", ".parquet")
RELEASE_STAGES = ("card", "publish")
# Stages in pipeline order, for display; unknown stages follow in name order.
STAGE_ORDER = ("base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate", "sweep_report",
               "card", "publish")


@dataclass
class ReleaseInputs:
    root: Path
    params: Params
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)   # stage -> LineageRecord dict
    dvc_lock: dict[str, Any] | None = None
    dvc_lock_path: Path | None = None
    metrics: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # eval/data/train -> flat dict
    metric_paths: dict[str, Path] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    reports: dict[str, Path] = field(default_factory=dict)  # name -> JSON report file
    model_dir: Path | None = None
    dataset_dir: Path | None = None
    splits: dict[str, int] = field(default_factory=dict)     # split name -> rows
    split_files: dict[str, Path] = field(default_factory=dict)
    dataset_columns: list[str] = field(default_factory=list)
    side_tables: dict[str, Path] = field(default_factory=dict)  # provenance -> its Parquet file
    eval_tables: dict[str, Path] = field(default_factory=dict)  # evaluate's per-prompt tables (test, dev, ifeval)

    def record(self, stage: str) -> dict[str, Any] | None:
        return self.lineage.get(stage)

    def report(self, kind: str) -> dict[str, Any] | None:
        path = self.reports.get(kind)
        return read_json(path) if path else None

    def stages(self) -> list[str]:
        known = [s for s in STAGE_ORDER if s in self.lineage]
        return known + sorted(s for s in self.lineage if s not in STAGE_ORDER)

    def data_sources(self) -> list[dict[str, Any]]:
        """data.sources as the ingest stage read them (its lineage record), else from params."""
        read = (self.record("ingest") or {}).get("params", {})
        # ingest lists `data.sources` in its READS, so its record keys the list by that dotted name
        sources = read.get("data.sources")
        if sources is None:
            data = read.get("data") or self.params.section_dump("data") or {}
            sources = data.get("sources") if isinstance(data, dict) else None
        return [s for s in sources or [] if isinstance(s, dict)]

    def source_path(self, source: dict[str, Any]) -> str:
        return resolve_paths_ref(str(source.get("path", "")), self.params.section_dump("paths"))

    def eval_prompt_sets(self) -> dict[str, list[Path]]:
        """The prompt sets the evaluate stage read, by the params.paths key naming each (test_prompts,
        general_prompts, ...): its lineage record's prompt-file inputs, else paths.test_prompts."""
        paths = {str(v): k for k, v in self.params.section_dump("paths").items() if isinstance(v, str)}
        rec = self.record("evaluate")
        named = [a["path"] for a in (rec or {}).get("inputs", []) if isinstance(a, dict) and a.get("path") in paths]
        if rec is None:
            named = [self.params.paths.test_prompts]
        out: dict[str, list[Path]] = {}
        for rel in named:
            key, f = paths.get(rel, Path(rel).stem), self.root / rel
            files = [f] if f.is_file() else sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else []
            files = [x for x in files if x.suffix in EVAL_SET_SUFFIXES]
            # prompt sets only: not the judge template, caches or output folders evaluate also reads
            if files and (key.endswith(("_prompts", "_subset")) or "ifeval" in key):
                out[key] = files
        return out

    def stage_metrics(self, stage: str) -> dict[str, Any] | None:
        """metrics/<stage>.json of a data stage (generate, rate), for the dataset card; None when absent."""
        path = self.root / self.params.paths.metrics / f"{stage}.json"
        value = read_json(path) if path.is_file() else None
        return value if isinstance(value, dict) else None

    def stage_params(self, stage: str, section: str) -> dict[str, Any]:
        """A params section as `stage` read it (its lineage record), else as params.yaml has it now."""
        got = ((self.record(stage) or {}).get("params") or {}).get(section)
        return got if isinstance(got, dict) else (self.params.section_dump(section) or {})

    def train_params(self) -> dict[str, Any]:
        rec = self.record("train")
        return (rec or {}).get("params", {}).get("train") or self.params.section_dump("train") or {}


def resolve_paths_ref(value: str, paths: dict[str, Any]) -> str:
    """`${paths.rated}` (how data.sources refers to pipeline outputs) -> the path it names."""
    m = re.fullmatch(r"\$\{paths\.(\w+)\}", value.strip())
    return str(paths.get(m.group(1), value)) if m else value


def read_dvc_lock(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(path, None, "valid YAML", str(e).splitlines()[0]) from None


def dvc_stage_hashes(lock: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per stage: its command, the md5 of each dependency and output, and a digest of its params."""
    from pipeline.core.lineage import sha256_json

    out: dict[str, dict[str, Any]] = {}
    for name, st in ((lock or {}).get("stages") or {}).items():
        def hashes(items):
            return {i.get("path"): i.get("md5") or i.get("hash") for i in items or [] if isinstance(i, dict)}
        out[name] = {"cmd": st.get("cmd"), "deps": hashes(st.get("deps")), "outs": hashes(st.get("outs")),
                     "params_sha256": sha256_json(st.get("params") or {})}
    return out


def _find_reports(folder: Path) -> dict[str, Path]:
    """JSON reports by name, two levels deep: `decontamination.json` -> decontamination,
    `validation/report.json` -> validation, `pairs_validation/report.json` -> pairs_validation."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    files = sorted(p for p in [*folder.glob("*.json"), *folder.glob("*/*.json")] if p.is_file())
    for p in files:
        nested = p.parent != folder
        name = p.parent.name if nested and p.stem == "report" else (f"{p.parent.name}_{p.stem}" if nested else p.stem)
        if "decontam" in name:
            name = "decontamination"
        found.setdefault(name, p)
    return found


def _parquet_splits(folder: Path) -> tuple[dict[str, int], dict[str, Path], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, files, columns = {}, {}, []
    for p in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            meta = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(p, None, "readable Parquet", str(e).splitlines()[0]) from None
        rows[p.stem] = meta.metadata.num_rows
        files[p.stem] = p
        # the preference splits' columns (provenance.parquet sorts first but is a side table)
        if "prompt" in meta.schema_arrow.names and not columns:
            columns = list(meta.schema_arrow.names)
    return rows, files, columns


def gather(params: Params, root: str | Path = ".", require_model: bool = True) -> ReleaseInputs:
    """Read every release input under `root`. Only the model and the dataset are required."""
    root = Path(root).resolve()
    p = params.paths
    inp = ReleaseInputs(root=root, params=params)
    lineage_dir = root / p.lineage
    for f in sorted(lineage_dir.glob("*.json")) if lineage_dir.is_dir() else []:
        rec = read_json(f)
        # The release's own stages are not part of what it releases (and would make cards differ between them).
        if isinstance(rec, dict) and "stage" in rec and rec["stage"] not in RELEASE_STAGES:
            inp.lineage[rec["stage"]] = rec
    from pipeline.core.rounds import release_lineage

    inp.lineage = release_lineage(inp.lineage, params)  # a later DPO round ships: its records are train, evaluate, ...
    inp.dvc_lock_path = root / "dvc.lock"
    inp.dvc_lock = read_dvc_lock(inp.dvc_lock_path)
    for name in METRIC_FILES:
        path = root / p.metrics / f"{name}.json"
        inp.metric_paths[name] = path
        value = read_json(path) if path.is_file() else None
        inp.metrics[name] = value if isinstance(value, dict) else None
    plots = root / p.plots
    inp.plots = sorted(x for x in plots.rglob("*.png") if x.is_file()) if plots.is_dir() else []
    inp.reports = _find_reports(root / p.reports)
    inp.model_dir = root / p.model
    inp.dataset_dir = root / p.dataset
    if require_model and not any(inp.model_dir.glob("*.safetensors")):
        raise SourceError(f"{p.model}: no trained safetensors model to release (run `dvc repro train`)")
    inp.splits, inp.split_files, inp.dataset_columns = _parquet_splits(inp.dataset_dir)
    for name in SIDE_TABLES:
        if name in inp.split_files:
            inp.side_tables[name] = inp.split_files.pop(name)
            inp.splits.pop(name)
    from pipeline.release.dataset_repo import EVAL_ANSWER_UNITS

    for unit in EVAL_ANSWER_UNITS:
        f = root / p.eval_dir / f"{unit}.parquet"
        if f.is_file():
            inp.eval_tables[unit] = f
    if require_model and not inp.splits:
        raise SourceError(f"{p.dataset}: no Parquet splits to release (run `dvc repro build`)")
    return inp


def flat_numbers(d: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) dict with dotted keys; booleans and strings are left out."""
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)
