"""`openrelease audit PATH_OR_REPO`: check that a release's code, data and weights belong together.

For a bundle folder (what `publish --dry-run` wrote) or a Hub model repo id: the signature verifies;
every file's sha256 and size match the manifest and nothing unlisted is present; the dataset is the
repo and revision the manifest names and holds the very Parquet files the train stage read; the
weights are those the train stage wrote; the source archive is the manifest's commit; the card's
numbers match the evaluation results in the bundle; no released pair derives from a record the
manifest lists as taken down, and both cards' "Data removals" sections say what the manifest says
(pipeline.release.takedowns). Then it prints the lineage as a tree. Exit 0 when
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
from pipeline.core.lineage import sha256_file
from pipeline.release.manifest import (
    DATASET_DIR,
    HUB_EXTRAS,
    MANIFEST_FILE,
    MODEL_DIR,
    UNLISTED,
    release_files,
)
from pipeline.release.takedowns import audit_problems as takedown_problems
from pipeline.release.tree import lineage_tree
from pipeline.release.trust import (
    EXIT_FAILED,
    EXIT_PASSED,
    EXIT_UNANCHORED,
    Anchor,
    AuditUsageError,
    check_signature,
    manifest_problems,
)

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    tree: str = ""
    anchor: str | None = None    # what the signer was verified against; None: not verified
    unanchored: bool = False     # the signature is valid but only against the bundle's own key


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
    present = {p.relative_to(folder).as_posix(): p for p in release_files(folder)}
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


def _check_eval_sets(manifest: dict[str, Any], dataset: Path) -> list[str]:
    """Each published evaluation prompt set (dataset/eval/<name>/) is byte for byte what evaluate read."""
    folder = dataset / "eval"
    if not folder.is_dir():
        return []
    paths = (manifest.get("params") or {}).get("paths") or {}
    read = {a.get("path"): a for a in ((manifest.get("lineage") or {}).get("evaluate") or {}).get("inputs", [])}
    problems = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        art = read.get(paths.get(sub.name))
        if art is None:
            problems.append(f"{DATASET_DIR}/eval/{sub.name}: the evaluate stage's record lists no paths.{sub.name} input")
            continue
        recorded = art.get("files") or {Path(str(art["path"])).name: art.get("sha256")}
        for f in sorted(x for x in sub.iterdir() if x.is_file()):
            if recorded.get(f.name) != sha256_file(f):
                problems.append(f"{DATASET_DIR}/eval/{sub.name}/{f.name}: not the prompts the evaluate stage read")
    return problems


def _commit_in_clone(repo_root: Path | None, commit: Any) -> bool:
    """Whether a local clone of the code repository holds the release's commit (what the tag names)."""
    from pipeline.release.gitinfo import git

    return (repo_root is not None and isinstance(commit, str)
            and git(repo_root, "cat-file", "-e", f"{commit}^{{commit}}", check=False) is not None)


def _check_archive(manifest: dict[str, Any], model: Path, repo_root: Path | None) -> tuple[list[str], list[str]]:
    from pipeline.release.gitinfo import archive_commit, source_archive

    code = manifest.get("code") or {}
    arch = model / (code.get("archive") or {}).get("path", "")
    if not arch.is_file():
        return [f"source archive {arch.name or '?'}: missing"], []
    problems, notes = [], []
    commit = archive_commit(arch)
    if commit != code.get("commit"):
        problems.append(f"source archive is of commit {commit}, manifest names {code.get('commit')}")
    if _commit_in_clone(repo_root, code.get("commit")):
        with tempfile.TemporaryDirectory() as tmp:
            again = source_archive(repo_root, code["commit"], arch.name.removesuffix(".tar.gz"), Path(tmp) / arch.name)
            if sha256_file(again) != sha256_file(arch):
                problems.append(f"source archive differs from `git archive {code['commit'][:12]}` of this clone")
            else:
                notes.append(f"source archive re-created from this clone's commit {code['commit'][:12]}: identical")
    else:
        notes.append("source archive not re-created (its commit is not in a local clone)")
    return problems, notes


def _check_eval_results(folder: Path, expected: list[float]) -> list[str]:
    """The `.eval_results/*.yaml` values are the model-index's, each once (read as the Hub parses them)."""
    import yaml
    from huggingface_hub import parse_eval_result_entries

    values = []
    for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            values += [e.value for e in parse_eval_result_entries(yaml.safe_load(f.read_text(encoding="utf-8")) or [])]
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
            return [f".eval_results/{f.name} unreadable: {e}"]
    if sorted(values) != sorted(expected):
        return [f".eval_results/ holds {sorted(values)}, the model-index {sorted(expected)}"]
    return []


def _check_cards(model: Path, dataset: Path) -> list[str]:
    from huggingface_hub import ModelCard

    from pipeline.core.io import read_json
    from pipeline.release.cards import _table, eval_table
    from pipeline.release.hub_results import EVAL_RESULTS_DIR, index_by_name
    from pipeline.release.inputs import SIDE_TABLES

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
    expected = index_by_name(metrics)   # entries are matched by metric_name: several share metric_type accuracy
    seen = {}
    for r in card.data.eval_results or []:
        seen[r.metric_name] = r.metric_value
    problems += _check_eval_results(model / EVAL_RESULTS_DIR, list(expected.values()))
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
        for f in sorted(x for x in (dataset / "data").glob("*.parquet") if x.stem not in SIDE_TABLES):
            try:
                splits[f.stem] = pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowException, OSError) as e:
                problems.append(f"{DATASET_DIR}/data/{f.name}: unreadable Parquet ({e})")
        if _table(["split", "pairs"], [[s, n] for s, n in splits.items()]) not in ds_readme.read_text(encoding="utf-8"):
            problems.append("dataset card: the split sizes do not match the Parquet files")
    else:
        problems.append("dataset card README.md is missing")
    return problems


def sweep_params_at_tag(manifest: dict[str, Any], repo_root: Path | None) -> tuple[Any, str] | None:
    """params.yaml's `sweep` section at the release's commit, read from the clone with `git show` (the
    same clone and commit the source archive is re-made from), and where it was read; None without one."""
    import yaml

    from pipeline.release.gitinfo import git

    commit = (manifest.get("code") or {}).get("commit")
    if not _commit_in_clone(repo_root, commit):
        return None
    where = f"params.yaml at tag {manifest.get('version')} (commit {commit[:12]})"
    text = git(repo_root, "show", f"{commit}:params.yaml", check=False)
    try:
        raw = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        raw = None
    return (raw.get("sweep") if isinstance(raw, dict) else None), where


def _with_sweep(manifest: dict[str, Any], model: Path, problems: list[str], checked: list[str],
                repo_root: Path | None = None):
    from pipeline.release.sweep_release import check

    p, n = check(manifest, model, sweep_params_at_tag(manifest, repo_root) if manifest.get("sweep") else None)
    return problems + p, checked + n


def check_bundle(path: Path, public_key: Path | None = None, repo_root: Path | None = None,
                 dataset_dir: Path | None = None, anchor: Anchor | None = None) -> AuditReport:
    """Every check on a bundle folder; problems are collected, not raised."""
    from pipeline.core.io import read_json

    anchor = anchor or Anchor(public_key=public_key, clone=repo_root)
    report = AuditReport()
    model, dataset = _layout(path)
    dataset = dataset_dir or dataset
    try:
        manifest = read_json(model / MANIFEST_FILE)
    except DataError as e:
        report.problems.append(f"manifest.json unreadable: {e}")
        return report
    structure = manifest_problems(manifest)
    if structure:
        report.problems += structure
        return report
    report.manifest = manifest
    check_signature(report, model, manifest, anchor)
    files = manifest["files"]
    report.problems += _check_files(model, files.get("model", []), MODEL_DIR, UNLISTED)
    report.problems += _check_files(dataset, files.get("dataset", []), DATASET_DIR, frozenset())
    report.problems += _check_lineage_links(manifest, model, dataset)
    report.problems += _check_eval_sets(manifest, dataset)
    arch_problems, notes = _check_archive(manifest, model, repo_root or anchor.clone)
    report.problems += arch_problems
    report.checked += notes
    report.problems += _check_cards(model, dataset)
    removal_problems, removal_notes = takedown_problems(manifest, model, dataset)
    report.problems += removal_problems
    report.checked += removal_notes
    report.problems, report.checked = _with_sweep(manifest, model, report.problems, report.checked,
                                                  repo_root or anchor.clone)
    report.checked.append(f"{len(files.get('model', []))} model and {len(files.get('dataset', []))} dataset "
                          "file(s) checked against the manifest")
    report.tree = lineage_tree(manifest)
    return report


def audit_hub(repo_id: str, revision: str, endpoint: str, public_key: Path | None, repo_root: Path | None,
              anchor: Anchor | None = None) -> AuditReport:
    """Download the model repo at `revision` and the dataset repo the manifest names, then check them."""
    from pipeline.core.io import read_json
    from pipeline.release import hub

    with tempfile.TemporaryDirectory(prefix="openrelease-audit-") as tmp:
        root = Path(tmp)
        commit = hub.download_repo(endpoint, repo_id, "model", revision, root / MODEL_DIR)
        if not (root / MODEL_DIR / MANIFEST_FILE).is_file():
            raise AuditError(f"{repo_id}@{revision}: no {MANIFEST_FILE}: not an open-release repo")
        try:
            manifest = read_json(root / MODEL_DIR / MANIFEST_FILE)
        except DataError as e:
            return AuditReport(problems=[f"manifest.json unreadable: {e}"])
        structure = manifest_problems(manifest)
        if structure:
            return AuditReport(problems=structure)
        ds = manifest["repos"][DATASET_DIR]
        problems = []
        if manifest["repos"][MODEL_DIR]["repo_id"] != repo_id:
            problems.append(f"the manifest names model repo {manifest['repos'][MODEL_DIR]['repo_id']}, not {repo_id}")
        hub.download_repo(endpoint, ds["repo_id"], "dataset", ds["revision"], root / DATASET_DIR)
        report = check_bundle(root, public_key, repo_root, anchor=anchor)
        report.problems = problems + report.problems
        report.checked.insert(0, f"downloaded {repo_id}@{revision} (commit {commit[:12]}) and "
                                 f"{ds['repo_id']}@{ds['revision']} (the dataset the manifest names) from {endpoint}")
        return report


def audit(target: str, public_key: Path | None = None, revision: str | None = None, endpoint: str | None = None,
          repo_root: Path | None = None, anchor: Anchor | None = None) -> AuditReport:
    anchor = anchor or Anchor(public_key=public_key, clone=repo_root)
    path = Path(target)
    if path.exists():
        return check_bundle(path, public_key, repo_root, anchor=anchor)
    if target.count("/") != 1 or target.startswith((".", "/")):
        raise AuditError(f"{target}: no such folder, and not a Hub repo id (namespace/name)")
    if endpoint is None:
        from pipeline.core.params import load_params

        endpoint = load_params().publish.endpoint if Path("params.yaml").is_file() else "https://huggingface.co"
    return audit_hub(target, revision or "main", endpoint.rstrip("/"), public_key, repo_root, anchor)


def exit_code(report: AuditReport) -> int:
    """0: consistent and the signer verified; 1: any mismatch; 3: consistent, but signed by an unanchored key."""
    if report.problems:
        return EXIT_FAILED
    return EXIT_UNANCHORED if report.unanchored or report.anchor is None else EXIT_PASSED


def _cmd_audit(args: argparse.Namespace) -> int:
    if bool(args.identity) != bool(args.issuer):
        raise AuditUsageError("keyless verification needs both --identity and --issuer")
    chosen = [n for n, on in (("--public-key", args.public_key), ("--repo-key", args.repo_key),
                              ("--identity/--issuer", args.identity)) if on]
    if len(chosen) > 1:
        raise AuditUsageError(f"give one trust anchor, not {' and '.join(chosen)}")
    clone = args.clone or (Path.cwd() if (Path.cwd() / ".git").exists() else None)
    anchor = Anchor(public_key=args.public_key, repo_key=args.repo_key, clone=clone, identity=args.identity,
                    issuer=args.issuer, trust_config=args.sigstore_trust_config)
    report = audit(args.target, args.public_key, args.revision, args.endpoint, clone, anchor)
    for line in report.checked:
        print(f"ok    {line}")
    if report.tree:
        print("\nlineage:\n" + report.tree + "\n")
    code = exit_code(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"problems": report.problems, "checked": report.checked,
                                               "anchor": report.anchor, "exit_code": code}, indent=2))
    if report.problems:
        print(f"AUDIT FAILED: {len(report.problems)} mismatch(es)")
        for p in report.problems:
            print(f"  - {p}")
    elif code == EXIT_UNANCHORED:
        print(f"AUDIT INCOMPLETE: release {report.manifest.get('version')} is consistent with its manifest and the "
              "signature is valid, but the signer is NOT verified (no trust anchor); exit 3")
    else:
        print(f"AUDIT PASSED: release {report.manifest.get('version')} is consistent with its signed manifest; "
              f"signer: {report.anchor}")
    return code


def register_cli(sub) -> None:
    p = sub.add_parser("audit", help="verify a release bundle folder or Hub repo against its signed manifest",
                       description="Exit codes: 0 passed and the signer verified against a trust anchor; "
                                   "1 a mismatch (AUDIT FAILED); 2 bad arguments; 3 consistent and validly "
                                   "signed, but the signer is NOT verified (no anchor given).")
    p.add_argument("target", help="a bundle folder (publish --dry-run --to DIR) or a Hub model repo id")
    anchors = p.add_argument_group("trust anchor (one of them; without one the signer is not verified: exit 3)")
    anchors.add_argument("--public-key", type=Path, default=None,
                         help="a PEM public key you obtained independently (pinned)")
    anchors.add_argument("--repo-key", action="store_true",
                         help="the public key committed in the code repository at the release tag, read from "
                              "the clone (--clone, or the current folder)")
    anchors.add_argument("--identity", default=None,
                         help="keyless Sigstore: the signer identity (GitHub Actions: the workflow URL, "
                              "https://github.com/OWNER/REPO/.github/workflows/release.yml@refs/tags/TAG)")
    anchors.add_argument("--issuer", default=None,
                         help="keyless Sigstore: the OIDC issuer (GitHub Actions: https://token.actions.githubusercontent.com)")
    anchors.add_argument("--sigstore-trust-config", type=Path, default=None,
                         help="keyless Sigstore: a ClientTrustConfig JSON, to verify without fetching the trust root")
    p.add_argument("--clone", type=Path, default=None, help="a clone of the code repository (default: the current "
                                                           "folder if it is one)")
    p.add_argument("--revision", default=None, help="Hub revision (a version tag) to audit; default main")
    p.add_argument("--endpoint", default=None, help="Hub URL; default publish.endpoint from params.yaml")
    p.add_argument("--json", default=None, help="also write the problems and checks to this JSON file")
    p.set_defaults(func=_cmd_audit)
