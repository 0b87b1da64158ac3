"""`openrelease trace SELECTOR`: everywhere one raw source record reached, here and in releases.

SELECTOR is one of
- `SOURCE:LINE` as provenance writes it (`hh:1234`: source `hh`, line / row 1234; a record that
  carries its own `id` is also found by `SOURCE:ID`, its row id);
- a raw record's sha256 (64 hex; what `data/takedowns.yaml` lists, pipeline.data.takedowns);
- `--text "..."`: rows holding a prompt turn or completion equal to the text after normalisation
  (NFKC, case-folded, whitespace collapsed: pipeline.core.text.normalize).

It reads this checkout's outputs (`paths.ingested` rows and counts, `paths.validated` quarantine and
kept rows, `paths.dataset` provenance, filtered and quarantined pairs) and every `--release` given: a
bundle folder (`publish --dry-run --to DIR`, or the folder holding model/ and dataset/), or a Hub
repo `REPO@REVISION` on `--endpoint` (default publish.endpoint): a model repo (its manifest names the
dataset) or the dataset repo itself. A record already taken down is no longer in the ingested rows;
a release's provenance still finds it by its hash, its source:line or (with --text) its pairs' text.

Records found: the rows the selector names, plus every row in any source with the same text (the same
normalised prompt turns and completions: a duplicate in another source, or another copy in the same
one), traced like the first; rows that share only the prompt are listed as `same_prompt` (build keeps
one of them as exact duplicates) but not traced further.

`--json` prints one object, schema `openrelease.trace/1`:
```
{"schema": "openrelease.trace/1",
 "selector": {"kind": "source_line" | "sha256" | "text", "value": str},
 "records": [{"row_id", "source", "source_line", "record_sha256": [str], "match": "selector" | "duplicate",
              "validate": "kept" | "quarantined" | "not validated", "quarantine_rules": [str],
              "build": "paired" | "filtered:<reason>" | "no pair" | "not built"}],
 "same_prompt": [{"row_id", "source", "source_line", "record_sha256"}],
 "excluded": [{"sha256", "reason", "date", "reference", "matched"}],   # taken down at ingest
 "pairs": [{"id", "split", "source", "source_row", "record_sha256", "status": "built" | "quarantined"}],
 "releases": [{"release", "version", "supersedes", "takedowns_listed": [sha256],
               "pairs": [{"id", "split"}], "trained_with": bool}],
 "record_sha256": [str],                        # every raw record hash traced
 "takedown_entries": [{"sha256", "reason", "date"}]}   # a starting point for data/takedowns.yaml
```
An unknown selector (found nowhere) is one line and exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError
from pipeline.core.io import iter_jsonl, read_json
from pipeline.core.text import normalize

SCHEMA = "openrelease.trace/1"
SHA = re.compile(r"^[0-9a-f]{64}$")
PROVENANCE = "provenance.parquet"


class TraceError(SourceError):
    """The selector names nothing this checkout or any given release holds."""


@dataclass
class Selector:
    kind: str   # source_line | sha256 | text
    value: str

    @classmethod
    def parse(cls, value: str | None, text: str | None) -> Selector:
        if text is not None:
            if value is not None:
                raise TraceError("give a SELECTOR or --text, not both")
            if not normalize(text):
                raise TraceError("--text is blank")
            return cls("text", normalize(text))
        if value is None:
            raise TraceError("give a SELECTOR (SOURCE:LINE or a record sha256) or --text")
        v = value.strip()
        if SHA.fullmatch(v.lower()):
            return cls("sha256", v.lower())
        if ":" in v and v.split(":", 1)[0] and v.split(":", 1)[1]:
            return cls("source_line", v)
        raise TraceError(f"selector {value!r}: expected SOURCE:LINE (e.g. hh:1234), a 64-hex record sha256, "
                         "or --text")

    def source_line(self) -> tuple[str, int | None]:
        name, _, rest = self.value.partition(":")
        return name, int(rest) if rest.isdigit() else None

    def matches_row(self, row: dict[str, Any]) -> bool:
        if self.kind == "sha256":
            return self.value in (row.get("record_sha256") or [])
        if self.kind == "source_line":
            name, line = self.source_line()
            return row.get("id") == self.value or (row.get("source") == name and line is not None
                                                   and row.get("source_line") == line)
        return self.value in texts_of(row)

    def matches_pair(self, pair: dict[str, Any]) -> bool:
        """Whether a provenance row (with its split row's text under `_texts`) is one the selector names."""
        if self.kind == "sha256":
            return self.value in (pair.get("record_sha256") or [])
        if self.kind == "source_line":
            name, line = self.source_line()
            pid = str(pair.get("id") or "")
            return pid.startswith(self.value + "#") or (
                line is not None and pair.get("source") == name and str(pair.get("source_row", "")).endswith(f":{line}"))
        return self.value in (pair.get("_texts") or ())


def texts_of(row: dict[str, Any]) -> set[str]:
    """The normalised prompt turns and completions of a normalised row."""
    out = {normalize(m.get("content") or "") for m in row.get("prompt") or [] if isinstance(m, dict)}
    out |= {normalize(c.get("content") or "") for c in row.get("completions") or [] if isinstance(c, dict)}
    return out - {""}


def _fingerprints(row: dict[str, Any]) -> tuple[str, str]:
    """(whole text, prompt only) digests: the same record in another layout or source has the same whole text."""
    prompt = [[m.get("role"), normalize(m.get("content") or "")] for m in row.get("prompt") or []]
    comps = sorted(normalize(c.get("content") or "") for c in row.get("completions") or [])
    digest = lambda x: hashlib.sha256(json.dumps(x, ensure_ascii=False).encode()).hexdigest()  # noqa: E731
    return digest([prompt, comps]), digest(prompt)


# ---------------------------------------------------------------------------------------------- releases

@dataclass
class ReleaseView:
    """What trace and the card need from a release: its name, manifest (None: a bare dataset) and dataset folder."""

    name: str
    manifest: dict[str, Any] | None
    dataset: Path

    @property
    def version(self) -> str | None:
        return (self.manifest or {}).get("version")

    def provenance(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        f = self.dataset / "data" / PROVENANCE
        if not f.is_file():
            raise SourceError(f"release {self.name}: no data/{PROVENANCE}: its pairs cannot be traced")
        return pq.read_table(f).to_pylist()

    def split_texts(self) -> dict[str, set[str]]:
        """pair id -> its normalised prompt turns and completions, from the published splits."""
        import pyarrow.parquet as pq

        out: dict[str, set[str]] = {}
        for f in sorted((self.dataset / "data").glob("*.parquet")):
            if f.name == PROVENANCE:
                continue
            for r in pq.read_table(f).to_pylist():
                if "id" in r:
                    msgs = [*(r.get("prompt") or []), *(r.get("chosen") or []), *(r.get("rejected") or [])]
                    out[r["id"]] = {normalize(m.get("content") or "") for m in msgs if isinstance(m, dict)} - {""}
        return out


def load_release(ref: str, endpoint: str | None, tmp: Path, texts: bool = False) -> ReleaseView:
    """A bundle folder, a dataset folder, or `REPO@REVISION` on the Hub (model repo or dataset repo)."""
    from pipeline.release.manifest import DATASET_DIR, MANIFEST_FILE, MODEL_DIR

    path = Path(ref)
    if path.exists():
        for model, dataset in ((path / MODEL_DIR, path / DATASET_DIR), (path, path.parent / DATASET_DIR)):
            if (model / MANIFEST_FILE).is_file():
                return ReleaseView(ref, read_json(model / MANIFEST_FILE), dataset)
        if (path / "data" / PROVENANCE).is_file():
            return ReleaseView(ref, None, path)
        raise SourceError(f"release {ref}: no model/{MANIFEST_FILE} and no data/{PROVENANCE}: not a release folder")
    if "@" not in ref or ref.count("/") != 1:
        raise SourceError(f"release {ref}: no such folder, and not a Hub repo at a revision (namespace/name@revision)")
    from pipeline.release import hub

    if not endpoint:
        raise SourceError(f"release {ref}: a Hub release needs --endpoint or publish.endpoint")
    repo, rev = ref.rsplit("@", 1)
    manifest = hub.fetch_json(endpoint, repo, MANIFEST_FILE, rev)
    ds_repo, ds_rev = repo, rev
    if isinstance(manifest, dict) and isinstance((manifest.get("repos") or {}).get(DATASET_DIR), dict):
        ds = manifest["repos"][DATASET_DIR]
        ds_repo, ds_rev = ds["repo_id"], ds["revision"]
    else:
        manifest = None  # a dataset repo named directly; its model repo's manifest is not known here
    dest = tmp / re.sub(r"[^A-Za-z0-9_.-]", "_", ref)
    files = [f"data/{PROVENANCE}"]
    if texts:
        files += [p for p in hub.list_files(endpoint, ds_repo, "dataset", ds_rev)
                  if p.startswith("data/") and p.endswith(".parquet") and p.count("/") == 1 and p not in files]
    for f in files:
        if hub.fetch_file(endpoint, ds_repo, f, ds_rev, dest, repo_type="dataset") is None:
            raise SourceError(f"release {ref}: dataset {ds_repo}@{ds_rev} has no {f}")
    return ReleaseView(ref, manifest, dest)


def trace_release(view: ReleaseView, sel: Selector, shas: set[str], row_ids: set[str]) -> dict[str, Any]:
    """The release's pairs that derive from a traced record (by hash, row id or, for --text, their text)."""
    texts = view.split_texts() if sel.kind == "text" else {}
    found = []
    for p in view.provenance():
        if texts:
            p["_texts"] = texts.get(p.get("id"), set())
        pid = str(p.get("id") or "")
        hit = bool(shas & set(p.get("record_sha256") or [])) or pid.split("#", 1)[0] in row_ids or sel.matches_pair(p)
        if hit:
            found.append({"id": pid, "split": p.get("split"), "source": p.get("source"),
                          "source_row": p.get("source_row"), "record_sha256": list(p.get("record_sha256") or [])})
    listed = [t.get("sha256") for t in ((view.manifest or {}).get("takedowns") or {}).get("applied", [])]
    return {"release": view.name, "version": view.version,
            "supersedes": ((view.manifest or {}).get("supersedes") or {}).get("release"),
            "takedowns_listed": sorted(s for s in listed if s in shas or any(s in f["record_sha256"] for f in found)),
            "pairs": found, "trained_with": any(f["split"] == "train" for f in found)}


# ---------------------------------------------------------------------------------------------- this checkout

def _ingested_rows(path: Path):
    return iter_jsonl(path) if path.is_file() else iter(())


def trace(root: Path, paths: Any, sel: Selector, releases: list[str] = (), endpoint: str | None = None) -> dict[str, Any]:
    """The trace record (module docstring) for `sel` over the outputs under `root` and `releases`."""
    ingested = root / paths.ingested
    seeds, index = [], []
    for _, row in _ingested_rows(ingested / "rows.jsonl"):
        full, prompt = _fingerprints(row)
        entry = {"row_id": row.get("id"), "source": row.get("source"), "source_line": row.get("source_line"),
                 "record_sha256": list(row.get("record_sha256") or []), "_full": full, "_prompt": prompt}
        index.append(entry)
        if sel.matches_row(row):
            seeds.append(entry)
    full_fps = {e["_full"] for e in seeds}
    prompt_fps = {e["_prompt"] for e in seeds}
    seed_ids = {e["row_id"] for e in seeds}
    records = [{**e, "match": "selector" if e["row_id"] in seed_ids else "duplicate"}
               for e in index if e["row_id"] in seed_ids or e["_full"] in full_fps]
    same_prompt = [{k: e[k] for k in ("row_id", "source", "source_line", "record_sha256")}
                   for e in index if e["_prompt"] in prompt_fps and e["_full"] not in full_fps]
    del index
    shas = {s for r in records for s in r["record_sha256"]}
    if sel.kind == "sha256":
        shas.add(sel.value)
    row_ids = {r["row_id"] for r in records}

    counts = read_json(ingested / "counts.json") if (ingested / "counts.json").is_file() else {}
    excluded = [t for t in counts.get("takedowns") or [] if t.get("sha256") in shas and t.get("matched")]

    with tempfile.TemporaryDirectory(prefix="openrelease-trace-") as tmp:
        views = [load_release(r, endpoint, Path(tmp), texts=sel.kind == "text") for r in releases]
        rel = [trace_release(v, sel, shas, row_ids) for v in views]
    # A record found only in a release (taken down since): its hashes and row ids join the trace.
    for r in rel:
        for p in r["pairs"]:
            shas |= set(p["record_sha256"])
            row_ids.add(p["id"].split("#", 1)[0])
    if excluded:  # taken down here: the file's own entries name the hash
        shas |= {t["sha256"] for t in excluded}

    pairs = _local_pairs(root, paths, sel, shas, row_ids)
    _verdicts(root, paths, records, pairs)
    if not records and not pairs and not excluded and not any(r["pairs"] for r in rel):
        where = [f"{paths.ingested}/rows.jsonl", f"{paths.dataset}/{PROVENANCE}", *releases]
        raise TraceError(f"{sel.kind} {sel.value!r}: no ingested row, pair or release holds it "
                         f"(looked in {', '.join(where)})")
    for r in records:
        r.pop("_full"), r.pop("_prompt")
    return {"schema": SCHEMA, "selector": {"kind": sel.kind, "value": sel.value}, "records": records,
            "same_prompt": same_prompt, "excluded": excluded, "pairs": pairs, "releases": rel,
            "record_sha256": sorted(shas),
            "takedown_entries": [{"sha256": s, "reason": "<why>", "date": "<YYYY-MM-DD>"} for s in sorted(shas)]}


def _local_pairs(root: Path, paths: Any, sel: Selector, shas: set[str], row_ids: set[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    dataset = root / paths.dataset
    out = []
    f = dataset / PROVENANCE
    if f.is_file():
        for p in pq.read_table(f).to_pylist():
            pid = str(p.get("id") or "")
            if shas & set(p.get("record_sha256") or []) or pid.split("#", 1)[0] in row_ids or (
                    sel.kind != "text" and sel.matches_pair(p)):
                out.append({"id": pid, "split": p.get("split"), "source": p.get("source"),
                            "source_row": p.get("source_row"), "record_sha256": list(p.get("record_sha256") or []),
                            "status": "built"})
    q = dataset / "quarantine.jsonl"
    for _, e in (iter_jsonl(q) if q.is_file() else ()):
        pair = e.get("pair") or {}
        pid = str(pair.get("id") or "")
        if pid.split("#", 1)[0] in row_ids or shas & set(pair.get("record_sha256") or []):
            out.append({"id": pid, "split": pair.get("split"), "source": pair.get("source"),
                        "source_row": pair.get("source_row"), "record_sha256": list(pair.get("record_sha256") or []),
                        "status": "quarantined"})
    return out


def _verdicts(root: Path, paths: Any, records: list[dict], pairs: list[dict]) -> None:
    """validate's and build's verdict on each traced row, in place."""
    import pyarrow.parquet as pq

    ids = {r["row_id"] for r in records}
    validated = root / paths.validated
    quarantined: dict[str, list[str]] = {}
    q = validated / "quarantine.jsonl"
    for _, e in (iter_jsonl(q) if q.is_file() else ()):
        rid = (e.get("row") or {}).get("id")
        if rid in ids:
            quarantined[rid] = list(e.get("rules") or [])
    kept_file = validated / "rows.parquet"
    kept = set()
    if kept_file.is_file():
        kept = {x for x in pq.read_table(kept_file, columns=["id"]).column("id").to_pylist() if x in ids}
    filtered: dict[str, str] = {}
    f = root / paths.dataset / "filtered.jsonl"
    for _, e in (iter_jsonl(f) if f.is_file() else ()):
        if e.get("id") in ids:
            filtered[e["id"]] = str(e.get("reason"))
    paired = {p["id"].split("#", 1)[0] for p in pairs}
    built = (root / paths.dataset / PROVENANCE).is_file()
    for r in records:
        rid = r["row_id"]
        r["validate"] = "quarantined" if rid in quarantined else "kept" if rid in kept else "not validated"
        r["quarantine_rules"] = quarantined.get(rid, [])
        r["build"] = ("paired" if rid in paired else f"filtered:{filtered[rid]}" if rid in filtered
                      else "not built" if not built or r["validate"] != "kept" else "no pair")


# ---------------------------------------------------------------------------------------------- report

def report_lines(t: dict[str, Any]) -> list[str]:
    sel = t["selector"]
    out = [f"trace {sel['kind']} {sel['value']!r}"]
    out.append(f"\nrecords ({len(t['records'])}):")
    for r in t["records"]:
        rules = f" ({', '.join(r['quarantine_rules'])})" if r["quarantine_rules"] else ""
        out.append(f"  {r['row_id']}  [{r['match']}]  line {r['source_line']}  validate: {r['validate']}{rules}  "
                   f"build: {r['build']}")
        for s in r["record_sha256"]:
            out.append(f"      record sha256 {s}")
    if t["same_prompt"]:
        out.append(f"\nsame prompt only, not traced ({len(t['same_prompt'])}): "
                   + ", ".join(r["row_id"] for r in t["same_prompt"][:10]) + (" ..." if len(t["same_prompt"]) > 10 else ""))
    for e in t["excluded"]:
        out.append(f"\ntaken down at ingest: {e['sha256']} ({e['reason']}, {e['date']}; {e['matched']} record(s) dropped)")
    out.append(f"\npairs in this checkout ({len(t['pairs'])}):")
    out += [f"  {p['split']:5}  {p['id']}  ({p['status']})" for p in t["pairs"]] or ["  none"]
    for r in t["releases"]:
        head = f"\nrelease {r['release']}" + (f" (version {r['version']})" if r["version"] else "")
        status = "CONTAINS" if r["pairs"] else "does not contain"
        trained = "; its weights were trained with it" if r["trained_with"] else ""
        out.append(f"{head}: {status} the record ({len(r['pairs'])} pair(s)){trained}")
        out += [f"  {p['split']:5}  {p['id']}" for p in r["pairs"]]
        if r["takedowns_listed"]:
            out.append(f"  its manifest lists the takedown of {', '.join(s[:12] + '...' for s in r['takedowns_listed'])}")
    if t["record_sha256"]:
        out.append("\nto take it down, add to data/takedowns.yaml:\ntakedowns:")
        out += [f"  - sha256: {s}\n    reason: <why>\n    date: <YYYY-MM-DD>" for s in t["record_sha256"]]
    return out


def _cmd_trace(args: argparse.Namespace) -> int:
    from pipeline.core.params import load_params

    params = load_params(args.params)
    sel = Selector.parse(args.selector, args.text)
    endpoint = (args.endpoint or params.publish.endpoint).rstrip("/")
    result = trace(Path.cwd(), params.paths, sel, args.release or [], endpoint)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print("\n".join(report_lines(result)))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("trace", help="every row, pair and release a raw source record reached",
                       description=__doc__.split("\n\n")[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("selector", nargs="?", default=None, help="SOURCE:LINE (as provenance writes it) or a record sha256")
    p.add_argument("--text", default=None, help="match rows by normalised text instead of a selector")
    p.add_argument("--release", action="append", default=None,
                   help="a release to look in: a bundle folder or REPO@REVISION on the Hub (repeatable)")
    p.add_argument("--endpoint", default=None, help="Hub URL for REPO@REVISION; default publish.endpoint")
    p.add_argument("--json", action="store_true", help="print the trace record (schema openrelease.trace/1)")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.set_defaults(func=_cmd_trace)
