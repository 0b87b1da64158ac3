"""`openrelease audit PATH_OR_REPO`: check that a release's code, data and weights belong together.

For a bundle folder (what `publish --dry-run` wrote) or a Hub model repo id: the signature verifies;
every file's sha256 and size match the manifest and nothing unlisted is present; the dataset is the
repo and revision the manifest names and holds the very Parquet files the train stage read; the
weights are those the train stage wrote; the source archive is the manifest's commit; the card's
numbers match the evaluation results in the bundle. Then it prints the lineage as a tree. Exit 0 when
all holds, 1 with every mismatch listed otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import AuditError, DataError
from pipeline.core.lineage import dir_files, sha256_file
from pipeline.release.manifest import DATASET_DIR, HUB_EXTRAS, MANIFEST_FILE, MODEL_DIR, SCHEMA, UNLISTED

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    tree: str = ""


def _layout(path: Path) -> tuple[Path, Path]:
    """(model folder, dataset folder) of a bundle, or of a model repo folder with a sibling dataset/."""
    if (path / MODEL_DIR / MANIFEST_FILE).is_file():
        return path / MODEL_DIR, path / DATASET_DIR
    if (path / MANIFEST_FILE).is_file():
        return path, path.parent / DATASET_DIR
    raise AuditError(f"{path}: no {MODEL_DIR}/{MANIFEST_FILE} or {MANIFEST_FILE}: not a release bundle")


def _check_files(folder: Path, entries: list[dict[str, Any]], repo: str, exclude: frozenset[str]) -> list[str]:
    problems = []
    if not folder.is_dir():
        return [f"{repo}: folder {folder} is missing"]
    listed = {e["path"]: e for e in entries}
    present = {p.relative_to(folder).as_posix(): p for p in dir_files(folder)}
    for rel, e in listed.items():
        p = present.get(rel)
        if p is None:
            problems.append(f"{repo}/{rel}: listed in the manifest but missing")
        elif p.stat().st_size != e["size"]:
            problems.append(f"{repo}/{rel}: size {p.stat().st_size} != manifest {e['size']}")
        elif sha256_file(p) != e["sha256"]:
            problems.append(f"{repo}/{rel}: sha256 {sha256_file(p)[:16]}... != manifest {e['sha256'][:16]}...")
    for rel in sorted(set(present) - set(listed) - exclude - HUB_EXTRAS):
        problems.append(f"{repo}/{rel}: present but not in the manifest")
    return problems


def _files_under(artifacts: list[dict[str, Any]], folder: str | None) -> dict[str, str] | None:
    """{relpath: sha256} of what a record lists under `folder`: the folder's files, or files inside it."""
    if not folder:
        return None
    found: dict[str, str] | None = None
    for art in artifacts:
        if art.get("path") == folder:
            found = {**(found or {}), **(art.get("files") or {})}
        elif str(art.get("path", "")).startswith(folder.rstrip("/") + "/"):
            found = {**(found or {}), art["path"][len(folder.rstrip("/")) + 1 :]: art["sha256"]}
    return found


def _check_lineage_links(manifest: dict[str, Any], model: Path, dataset: Path) -> list[str]:
    """The published weights are what train wrote; the published splits are what train read."""
    problems = []
    rec = (manifest.get("lineage") or {}).get("train") or {}
    paths = (manifest.get("params") or {}).get("paths") or {}
    wrote = _files_under(rec.get("outputs", []), paths.get("model"))
    if wrote is None:
        problems.append("manifest: no train lineage record of the model folder")
    else:
        for name in sorted(k for k in wrote if k.endswith(".safetensors") and "/" not in k):
            if (model / name).is_file() and sha256_file(model / name) != wrote[name]:
                problems.append(f"{MODEL_DIR}/{name}: not the weights the train stage wrote")
    read = _files_under(rec.get("inputs", []), paths.get("dataset"))
    if not read:
        problems.append("manifest: the train lineage record does not list the dataset it read")
    else:
        for name, sha in read.items():
            if name.endswith(".parquet"):
                f = dataset / "data" / name
                if not f.is_file() or sha256_file(f) != sha:
                    problems.append(f"{DATASET_DIR}/data/{name}: not the split the train stage read")
    return problems


def _check_archive(manifest: dict[str, Any], model: Path, repo_root: Path | None) -> tuple[list[str], list[str]]:
    from pipeline.release.gitinfo import archive_commit, git, source_archive

    code = manifest.get("code") or {}
    arch = model / (code.get("archive") or {}).get("path", "")
    if not arch.is_file():
        return [f"source archive {arch.name or '?'}: missing"], []
    problems, notes = [], []
    commit = archive_commit(arch)
    if commit != code.get("commit"):
        problems.append(f"source archive is of commit {commit}, manifest names {code.get('commit')}")
    if repo_root is not None and git(repo_root, "cat-file", "-e", f"{code.get('commit')}^{{commit}}", check=False) is not None:
        with tempfile.TemporaryDirectory() as tmp:
            again = source_archive(repo_root, code["commit"], arch.name.removesuffix(".tar.gz"), Path(tmp) / arch.name)
            if sha256_file(again) != sha256_file(arch):
                problems.append(f"source archive differs from `git archive {code['commit'][:12]}` of this clone")
            else:
                notes.append(f"source archive re-created from this clone's commit {code['commit'][:12]}: identical")
    else:
        notes.append("source archive not re-created (its commit is not in a local clone)")
    return problems, notes


def _check_cards(model: Path, dataset: Path) -> list[str]:
    from huggingface_hub import ModelCard

    from pipeline.core.io import read_json
    from pipeline.release.cards import _table, eval_table, model_index_metrics

    problems = []
    readme, results = model / "README.md", model / "eval" / "eval.json"
    if not readme.is_file():
        return ["model card README.md is missing"]
    metrics = read_json(results) if results.is_file() else None
    if metrics is None:
        problems.append("eval/eval.json is missing: the card's numbers cannot be checked")
    text = readme.read_text(encoding="utf-8")
    if eval_table(metrics) not in text:
        problems.append("model card: the evaluation table does not match eval/eval.json")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except ValueError as e:
        return [*problems, f"model card metadata unreadable: {e}"]
    expected = model_index_metrics(metrics)
    seen = {}
    for r in card.data.eval_results or []:
        seen[r.metric_type] = r.metric_value
    for k in sorted(set(expected) | set(seen)):
        if k not in seen:
            problems.append(f"model card model-index: {k} missing (eval.json has {expected[k]})")
        elif k not in expected:
            problems.append(f"model card model-index: {k} = {seen[k]} is not in eval/eval.json")
        elif seen[k] != expected[k]:
            problems.append(f"model card model-index: {k} = {seen[k]} but eval/eval.json has {expected[k]}")
    ds_readme = dataset / "README.md"
    if ds_readme.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        splits = {}
        for f in sorted((dataset / "data").glob("*.parquet")):
            try:
                splits[f.stem] = pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowException, OSError) as e:
                problems.append(f"{DATASET_DIR}/data/{f.name}: unreadable Parquet ({e})")
        if _table(["split", "pairs"], [[s, n] for s, n in splits.items()]) not in ds_readme.read_text(encoding="utf-8"):
            problems.append("dataset card: the split sizes do not match the Parquet files")
    else:
        problems.append("dataset card README.md is missing")
    return problems


def _with_sweep(manifest: dict[str, Any], model: Path, problems: list[str], checked: list[str]):
    from pipeline.release.sweep_release import check

    p, n = check(manifest, model)
    return problems + p, checked + n


def check_bundle(path: Path, public_key: Path | None = None, repo_root: Path | None = None,
                 dataset_dir: Path | None = None) -> AuditReport:
    """Every check on a bundle folder; problems are collected, not raised."""
    from pipeline.core.io import read_json
    from pipeline.release import signing

    report = AuditReport()
    model, dataset = _layout(path)
    dataset = dataset_dir or dataset
    try:
        manifest = read_json(model / MANIFEST_FILE)
    except DataError as e:
        report.problems.append(f"manifest.json unreadable: {e}")
        return report
    report.manifest = manifest
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        report.problems.append(f"manifest.json: not an {SCHEMA} manifest")
        return report
    bundled_key = model / signing.PUBLIC_KEY_FILE
    key = public_key or bundled_key
    try:
        signing.verify_folder(model, key)
        report.checked.append(f"signature verifies with {'the pinned key ' + str(public_key) if public_key else 'the bundled public key'}"
                              f" (sha256 {signing.public_key_fingerprint(key.read_bytes())[:16]}...)")
    except AuditError as e:
        report.problems.append(str(e))
    want_fp = (manifest.get("signing") or {}).get("public_key_sha256")
    if key.is_file() and signing.public_key_fingerprint(key.read_bytes()) != want_fp:
        report.problems.append("the public key is not the one the manifest names")
    files = manifest.get("files") or {}
    report.problems += _check_files(model, files.get("model", []), MODEL_DIR, UNLISTED)
    report.problems += _check_files(dataset, files.get("dataset", []), DATASET_DIR, frozenset())
    report.problems += _check_lineage_links(manifest, model, dataset)
    arch_problems, notes = _check_archive(manifest, model, repo_root)
    report.problems += arch_problems
    report.checked += notes
    report.problems += _check_cards(model, dataset)
    report.problems, report.checked = _with_sweep(manifest, model, report.problems, report.checked)
    report.checked.append(f"{len(files.get('model', []))} model and {len(files.get('dataset', []))} dataset "
                          "file(s) checked against the manifest")
    report.tree = lineage_tree(manifest)
    return report


def audit_hub(repo_id: str, revision: str, endpoint: str, public_key: Path | None, repo_root: Path | None) -> AuditReport:
    """Download the model repo at `revision` and the dataset repo the manifest names, then check them."""
    from pipeline.core.io import read_json
    from pipeline.release import hub

    with tempfile.TemporaryDirectory(prefix="openrelease-audit-") as tmp:
        root = Path(tmp)
        commit = hub.download_repo(endpoint, repo_id, "model", revision, root / MODEL_DIR)
        if not (root / MODEL_DIR / MANIFEST_FILE).is_file():
            raise AuditError(f"{repo_id}@{revision}: no {MANIFEST_FILE}: not an open-release repo")
        manifest = read_json(root / MODEL_DIR / MANIFEST_FILE)
        repos = manifest.get("repos") or {}
        ds = repos.get("dataset") or {}
        problems = []
        if (repos.get("model") or {}).get("repo_id") != repo_id:
            problems.append(f"the manifest names model repo {(repos.get('model') or {}).get('repo_id')}, not {repo_id}")
        hub.download_repo(endpoint, ds["repo_id"], "dataset", ds["revision"], root / DATASET_DIR)
        report = check_bundle(root, public_key, repo_root)
        report.problems = problems + report.problems
        report.checked.insert(0, f"downloaded {repo_id}@{revision} (commit {commit[:12]}) and "
                                 f"{ds['repo_id']}@{ds['revision']} (the dataset the manifest names) from {endpoint}")
        return report


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


def audit(target: str, public_key: Path | None = None, revision: str | None = None, endpoint: str | None = None,
          repo_root: Path | None = None) -> AuditReport:
    path = Path(target)
    if path.exists():
        return check_bundle(path, public_key, repo_root)
    if target.count("/") != 1 or target.startswith((".", "/")):
        raise AuditError(f"{target}: no such folder, and not a Hub repo id (namespace/name)")
    if endpoint is None:
        from pipeline.core.params import load_params

        endpoint = load_params().publish.endpoint if Path("params.yaml").is_file() else "https://huggingface.co"
    return audit_hub(target, revision or "main", endpoint.rstrip("/"), public_key, repo_root)


def _cmd_audit(args: argparse.Namespace) -> int:
    root = Path.cwd() if (Path.cwd() / ".git").exists() else None
    report = audit(args.target, args.public_key, args.revision, args.endpoint, root)
    for line in report.checked:
        print(f"ok    {line}")
    if report.tree:
        print("\nlineage:\n" + report.tree + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"problems": report.problems, "checked": report.checked}, indent=2))
    if report.problems:
        print(f"AUDIT FAILED: {len(report.problems)} mismatch(es)")
        for p in report.problems:
            print(f"  - {p}")
        return 1
    print(f"AUDIT PASSED: release {report.manifest.get('version')} is consistent with its signed manifest")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("audit", help="verify a release bundle folder or Hub repo against its signed manifest")
    p.add_argument("target", help="a bundle folder (publish --dry-run --to DIR) or a Hub model repo id")
    p.add_argument("--public-key", type=Path, default=None,
                   help="PEM public key the signature must verify with (default: the key in the bundle)")
    p.add_argument("--revision", default=None, help="Hub revision (a version tag) to audit; default main")
    p.add_argument("--endpoint", default=None, help="Hub URL; default publish.endpoint from params.yaml")
    p.add_argument("--json", default=None, help="also write the problems and checks to this JSON file")
    p.set_defaults(func=_cmd_audit)
