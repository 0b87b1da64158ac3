"""The lineage tree `openrelease audit` prints: weights <- train run <- dataset <- ... <- sources, with
hashes, row counts, licenses, commits and MLflow runs, read from a release manifest."""

from __future__ import annotations

from typing import Any


def lineage_tree(manifest: dict[str, Any]) -> str:
    """weights <- train run <- dataset <- ... <- sources, with hashes, licenses, commits and MLflow runs."""
    records = manifest.get("lineage") or {}
    paths = (manifest.get("params") or {}).get("paths") or {}
    producers: dict[str, str] = {}
    for stage, rec in records.items():
        for art in rec.get("outputs", []):
            producers.setdefault(art["path"], stage)

    def producer(path: str) -> str | None:  # the artifact itself, or the folder artifact holding it
        return producers.get(path) or next((s for f, s in producers.items() if path.startswith(f.rstrip("/") + "/")), None)
    licenses = _source_licenses(records, paths)
    repos = manifest.get("repos") or {}
    weights = [f for f in (manifest.get("files") or {}).get("model", []) if f["path"].endswith(".safetensors")
               and "/" not in f["path"]]
    lines = [f"release {manifest.get('version')}  code {str((manifest.get('code') or {}).get('commit'))[:12]}"
             f"{' (dirty tree)' if (manifest.get('code') or {}).get('dirty') else ''}  license "
             f"{(manifest.get('license') or {}).get('release')}"]
    for w in weights:
        lines.append(f"{w['path']}  sha256 {w['sha256'][:16]}  ({(repos.get('model') or {}).get('repo_id')})")
    seen: set[str] = set()

    def node(path: str, prefix: str, last: bool) -> None:
        stage = producer(path)
        branch = prefix + ("`-- " if last else "|-- ")
        child = prefix + ("    " if last else "|   ")
        if stage is None or stage in seen:
            return
        seen.add(stage)
        rec = records[stage]
        ml, git = rec.get("mlflow") or {}, rec.get("git") or {}
        lines.append(f"{branch}{stage}  mlflow run {ml.get('run_id', '?')}  commit {str(git.get('commit'))[:12]}"
                     f"{' dirty' if git.get('dirty') else ''}  params {str(rec.get('params_digest'))[:12]}")
        inputs = rec.get("inputs", [])
        for i, art in enumerate(inputs):
            end = i == len(inputs) - 1
            extra = []
            if art.get("rows") is not None:
                extra.append(f"{art['rows']} rows")
            if art["path"] in licenses:
                extra.append(licenses[art["path"]])
            if art["path"] == paths.get("dataset") or art["path"].startswith(f"{paths.get('dataset')}/"):
                ds = repos.get("dataset") or {}
                extra.append(f"published as {ds.get('repo_id')}@{ds.get('revision')}")
            lines.append(f"{child}{'`-- ' if end else '|-- '}{art['path']}  sha256 {art['sha256'][:16]}"
                         + (f"  ({', '.join(extra)})" if extra else ""))
            node(art["path"], child + ("    " if end else "|   "), True)

    node(paths.get("model", ""), "", True)
    if "train" not in seen:
        lines.append("`-- (no train lineage record)")
    return "\n".join(lines)


def _source_licenses(records: dict[str, Any], paths: dict[str, Any]) -> dict[str, str]:
    """Input path -> 'source NAME, license X' for data sources and the base model's file."""
    from pipeline.release.inputs import resolve_paths_ref

    out = {}
    for stage, rec in records.items():
        params = rec.get("params") or {}
        data = params.get("data") or {}
        listed = params.get("data.sources") or ((data.get("sources") or []) if isinstance(data, dict) else [])
        for s in listed:
            if isinstance(s, dict) and s.get("path"):
                out[resolve_paths_ref(str(s["path"]), paths)] = f"source {s.get('name')}, license {s.get('license')}"
        bm = params.get("base_model")
        if isinstance(bm, dict) and stage == "base_model":
            for art in rec.get("inputs", []):
                out[art["path"]] = f"base model {bm.get('name')}, license {bm.get('license')}"
    return out
