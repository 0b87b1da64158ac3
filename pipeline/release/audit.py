"""`openrelease audit PATH_OR_REPO`: check that a release's code, data and weights belong together.

For a bundle folder (what `publish --dry-run` wrote) or a Hub model repo id: the signature verifies;
every file's sha256 and size match the manifest and nothing unlisted is present; the dataset is the
repo and revision the manifest names and holds the very Parquet files the train stage read; the
weights are those the train stage wrote; the source archive is the manifest's commit; the card's
numbers match the evaluation results in the bundle; no HTML page (report.html, Data Docs) loads anything
from the network; no released pair derives from a record the
manifest lists as taken down, and both cards' "Data removals" sections say what the manifest says
(pipeline.release.takedowns). Then it prints the lineage as a tree. Exit 0 when
all holds, 1 with every mismatch listed otherwise.

What people download is audited as it is:
- a bundle folder (`model/` + `dataset/`), or a model repo folder as `hf download` gives it, with the
  dataset beside it as `dataset/`, or named by `--dataset FOLDER|REPO`; without one the audit checks
  the model repo only, says so on every dataset check (skipped) and in the verdict, and exits 0;
- a dataset repo folder alone, with `--model FOLDER|REPO` naming the signed manifest's repo;
- a Hub model repo id: both repos are downloaded; an unreachable Hub is one line and exit 1.

Output: one line per check, `ok`, `FAIL` (with the reason) or `skip` (with why), then the manifest's
non-passing release gates (`warn`), the lineage tree and a verdict line naming the trust anchor.

`--json FILE` writes (schema_version "openrelease.audit/1"; keys are only ever added within a version):
    schema_version  "openrelease.audit/1"
    verdict         "passed" | "failed" | "unanchored" (consistent, signer not verified: exit 3)
    exit_code       0 | 1 | 3
    target          what was audited, as given
    release         {version, commit, dirty, model_repo, dataset_repo, created_at} or null
    scope           {model: bool, dataset: bool}: which repos were checked
    anchor          {kind: "public-key" | "repo-key" | "sigstore" | null, verified: bool,
                     description, key_sha256 (64 hex, or null for keyless), identity, issuer}
    checks          [{name, status: "passed" | "failed" | "skipped", detail}]  every check, in order
    problems        [str]  every mismatch (the details of the failed checks)
    warnings        [{gate, status, detail}]  release gates the manifest records as not passing
    lineage         {hash_display, tree, stages_shown, stages_missing} or null; tree is nested
                    {kind, label, sha256 (full), detail, children} (pipeline.release.tree)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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
from pipeline.release.tree import lineage_graph, render_text
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


JSON_SCHEMA = "openrelease.audit/1"
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# A note that says a check did not run. Check code reports such notes in plain words ("...; not
# checked"); they are shown as skips, never as ok.
_SKIP_NOTE = re.compile(r"\bnot (?:checked|re-created)\b")


@dataclass
class Check:
    name: str
    status: str      # passed | failed | skipped
    detail: str


class _Step:
    def __init__(self) -> None:
        self.skipped: str | None = None

    def skip(self, why: str) -> None:
        self.skipped = why


@dataclass
class AuditReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    tree: str = ""
    anchor: str | None = None    # what the signer was verified against; None: not verified
    unanchored: bool = False     # the signature is valid but only against the bundle's own key
    checks: list[Check] = field(default_factory=list)
    graph: dict[str, Any] | None = None     # pipeline.release.tree.lineage_graph
    dataset_checked: bool = True
    anchor_kind: str | None = None

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @contextmanager
    def check(self, name: str, passed: str):
        """One named check: whatever problems and notes the body adds become its status and detail."""
        p0, c0, step = len(self.problems), len(self.checked), _Step()
        yield step
        new_p, new_c = self.problems[p0:], self.checked[c0:]
        if new_p:
            self.add(name, FAILED, "; ".join(new_p))
        elif step.skipped or any(_SKIP_NOTE.search(n) for n in new_c):
            self.add(name, SKIPPED, step.skipped or "; ".join(new_c))
        else:
            self.add(name, PASSED, "; ".join([passed, *new_c]) if passed else "; ".join(new_c))

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """The release gates the manifest records as anything but passed (a dev build's warnings)."""
        gates = (self.manifest or {}).get("gates") or []
        return [{"gate": g.get("name"), "status": g.get("status"), "detail": g.get("detail")}
                for g in gates if isinstance(g, dict) and g.get("status") != "pass"]


def _layout(path: Path) -> tuple[Path, Path, bool]:
    """(model folder, dataset folder, model only) of a bundle, or of a model repo folder (as `hf download`
    gives it) with or without a sibling dataset/. A bundle must hold both; a model repo download is
    checked alone when no dataset sits beside it."""
    if (path / MODEL_DIR / MANIFEST_FILE).is_file():
        return path / MODEL_DIR, path / DATASET_DIR, False
    if (path / MANIFEST_FILE).is_file():
        return path, path.parent / DATASET_DIR, not (path.parent / DATASET_DIR).is_dir()
    if (path / "data").is_dir() and (path / "README.md").is_file():
        raise AuditError(f"{path} is a dataset download; the signed manifest lives in the model repo: "
                         "give --model FOLDER|REPO")
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


def _check_lineage_links(manifest: dict[str, Any], model: Path, dataset: Path | None) -> list[str]:
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
    if dataset is None:  # a model-only download: the dataset half is reported as a skip
        return problems
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


def _check_offline_pages(folders: dict[str, Path | None]) -> tuple[int, list[str]]:
    """(HTML pages found, one problem per page that would load something remote) over the repo folders."""
    from pipeline.core.offline import folder_external_loads

    n, problems = 0, []
    for repo, folder in folders.items():
        if folder is None or not folder.is_dir():
            continue
        n += sum(1 for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in (".html", ".htm"))
        for rel, urls in folder_external_loads(folder).items():
            problems.append(f"{repo}/{rel} loads {len(urls)} remote file(s), e.g. {urls[0]}: it does not open offline")
    return n, problems


def _check_cards(model: Path, dataset: Path | None) -> list[str]:
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
    if dataset is None:  # a model-only download: the dataset card is reported as a skip
        return problems
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
    model, dataset, model_only = _layout(path)
    if dataset_dir is not None:
        if not dataset_dir.is_dir():
            raise AuditError(f"--dataset {dataset_dir}: no such folder")
        dataset, model_only = dataset_dir, False
    ds = None if model_only else dataset
    report.dataset_checked = ds is not None
    no_ds = ("model-only download: no dataset folder beside the model (give --dataset FOLDER|REPO to "
             "check it); dataset not checked")
    try:
        manifest = read_json(model / MANIFEST_FILE)
    except DataError as e:
        report.problems.append(f"manifest.json unreadable: {e}")
        report.add("manifest", FAILED, report.problems[-1])
        return report
    structure = manifest_problems(manifest)
    if structure:
        report.problems += structure
        report.add("manifest", FAILED, "; ".join(structure))
        return report
    report.add("manifest", PASSED, "structure as the audit reads it")
    report.manifest = manifest
    with report.check("signature", ""):
        check_signature(report, model, manifest, anchor)
    report.anchor_kind = ("sigstore" if anchor.identity else "public-key" if anchor.public_key
                          else "repo-key" if anchor.repo_key else None)
    if report.unanchored:  # the signature holds, but only against the key that came inside the release
        report.checks[-1] = Check("signature", PASSED, "valid against the public key inside the release "
                                  f"(sha256 {_key_sha256(report) or '?'})")
        report.add("signer", SKIPPED, "no trust anchor given, so the signer is NOT verified: give --public-key "
                                      "FILE, --repo-key (with a clone) or --identity/--issuer")
    files = manifest["files"]
    with report.check("model files", f"{len(files.get('model', []))} file(s): sha256 and size as listed, "
                                     "nothing unlisted"):
        report.problems += _check_files(model, files.get("model", []), MODEL_DIR, UNLISTED)
    with report.check("dataset files", f"{len(files.get('dataset', []))} file(s): sha256 and size as listed, "
                                       "nothing unlisted") as step:
        if ds is None:
            step.skip(no_ds)
        else:
            report.problems += _check_files(dataset, files.get("dataset", []), DATASET_DIR, frozenset())
    with report.check("lineage links", "the weights are those the train stage wrote"
                                       + ("" if ds is None else " and the splits those it read")):
        report.problems += _check_lineage_links(manifest, model, ds)
    with report.check("evaluation sets", "each published prompt set is what the evaluate stage read") as step:
        if ds is None:
            step.skip(no_ds)
        elif not (dataset / "eval").is_dir():
            step.skip("the dataset publishes no eval/ prompt sets")
        else:
            report.problems += _check_eval_sets(manifest, dataset)
    with report.check("croissant", "croissant.json lists every dataset file with its sha256") as step:
        from pipeline.release.croissant import CROISSANT_FILE, check_croissant

        if ds is None:
            step.skip(no_ds)
        elif not (dataset / CROISSANT_FILE).is_file():
            step.skip(f"the dataset publishes no {CROISSANT_FILE}")
        else:
            report.problems += check_croissant(dataset)
    with report.check("source archive", ""):
        arch_problems, notes = _check_archive(manifest, model, repo_root or anchor.clone)
        report.problems += arch_problems
        report.checked += notes
    if report.checks[-1].status == SKIPPED and not arch_problems:
        # the archive's commit was checked even when it could not be re-created from a clone
        report.checks[-1:] = [Check("source archive", PASSED, "of the manifest's commit "
                                    f"{str((manifest.get('code') or {}).get('commit'))[:12]}"),
                              Check("source archive rebuild", SKIPPED, "; ".join(notes) + " (give --clone DIR)")]
    with report.check("model card", "its evaluation table and model-index are eval/eval.json's numbers"):
        report.problems += _check_cards(model, ds)
    with report.check("dataset card", "its split sizes are the Parquet files' row counts") as step:
        if ds is None:
            step.skip(no_ds)
    with report.check("offline pages", "") as step:
        n_pages, page_problems = _check_offline_pages({MODEL_DIR: model, DATASET_DIR: ds})
        report.problems += page_problems
        if not n_pages:
            step.skip("the release has no HTML pages (report.html, Data Docs)")
        elif not page_problems:
            report.checked.append(f"{n_pages} HTML page(s) (report.html, Data Docs) load nothing from the network")
    with report.check("takedowns", "no released pair derives from a taken-down record") as step:
        if ds is None:
            step.skip(no_ds)
        else:
            removal_problems, removal_notes = takedown_problems(manifest, model, dataset)
            report.problems += removal_problems
            report.checked += removal_notes
    with report.check("sweep", "the sweep table, its rule and pick") as step:
        report.problems, report.checked = _with_sweep(manifest, model, report.problems, report.checked,
                                                      repo_root or anchor.clone)
        if not manifest.get("sweep"):
            step.skip("this release has no sweep (one training run)")
    report.checked.append(f"{len(files.get('model', []))} model and "
                          f"{len(files.get('dataset', [])) if ds is not None else 0} dataset "
                          "file(s) checked against the manifest")
    report.graph = lineage_graph(manifest)
    report.tree = render_text(report.graph)
    return report


def _key_sha256(report: AuditReport) -> str | None:
    """The full sha256 of the key the signature was checked with, as check_signature states it."""
    for text in [report.anchor or "", *report.checked]:
        m = re.search(r"sha256 ([0-9a-f]{64})", text)
        if m:
            return m.group(1)
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (it is not an OSError)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _download(endpoint: str, repo_id: str, repo_type: str, revision: str, dest: Path) -> str:
    """hub.download_repo, with an unreachable Hub turned into one line (exit 1), never a traceback."""
    from pipeline.core.errors import SourceError
    from pipeline.release import hub

    try:
        return hub.download_repo(endpoint, repo_id, repo_type, revision, dest)
    except _network_errors() as e:
        raise SourceError(f"cannot download {repo_type} repo {repo_id}@{revision}: the Hub at {endpoint} is "
                          f"unreachable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _is_repo_id(target: str) -> bool:
    return target.count("/") == 1 and not target.startswith((".", "/")) and not Path(target).exists()


def audit_hub(repo_id: str, revision: str, endpoint: str, public_key: Path | None, repo_root: Path | None,
              anchor: Anchor | None = None, dataset: str | None = None) -> AuditReport:
    """Download the model repo at `revision` and the dataset repo the manifest names, then check them."""
    from pipeline.core.io import read_json

    with tempfile.TemporaryDirectory(prefix="openrelease-audit-") as tmp:
        root = Path(tmp)
        commit = _download(endpoint, repo_id, "model", revision, root / MODEL_DIR)
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
        if dataset is not None and not _is_repo_id(dataset):  # a local dataset download stands in for the Hub's
            report = check_bundle(root / MODEL_DIR, public_key, repo_root, dataset_dir=Path(dataset), anchor=anchor)
            fetched = f"downloaded {repo_id}@{revision} (commit {commit[:12]}) from {endpoint}; dataset from {dataset}"
        else:
            ds_repo = dataset or ds["repo_id"]
            if ds_repo != ds["repo_id"]:
                problems.append(f"--dataset {ds_repo} is not the dataset repo the manifest names ({ds['repo_id']})")
            _download(endpoint, ds_repo, "dataset", ds["revision"], root / DATASET_DIR)
            report = check_bundle(root, public_key, repo_root, anchor=anchor)
            fetched = (f"downloaded {repo_id}@{revision} (commit {commit[:12]}) and {ds_repo}@{ds['revision']} "
                       f"(the dataset the manifest names) from {endpoint}")
        report.problems = problems + report.problems
        report.checked.insert(0, fetched)
        report.checks.insert(0, Check("download", FAILED if problems else PASSED, "; ".join([fetched, *problems])))
        return report


def _dataset_repo(model: Path, dataset: str, revision: str | None, endpoint: str, public_key: Path | None,
                  repo_root: Path | None, anchor: Anchor) -> AuditReport:
    """A local model download checked with the dataset repo it names, downloaded at the manifest's revision."""
    from pipeline.core.io import read_json

    m_file = model / MODEL_DIR / MANIFEST_FILE if (model / MODEL_DIR).is_dir() else model / MANIFEST_FILE
    try:
        manifest = read_json(m_file)
    except DataError as e:
        raise AuditError(f"manifest.json unreadable: {e}") from None
    ds = ((manifest.get("repos") or {}).get(DATASET_DIR) or {}) if isinstance(manifest, dict) else {}
    rev = revision or ds.get("revision") or "main"
    with tempfile.TemporaryDirectory(prefix="openrelease-audit-") as tmp:
        _download(endpoint, dataset, "dataset", rev, Path(tmp) / DATASET_DIR)
        report = check_bundle(model, public_key, repo_root, dataset_dir=Path(tmp) / DATASET_DIR, anchor=anchor)
    if ds.get("repo_id") and ds["repo_id"] != dataset:
        report.problems.insert(0, f"--dataset {dataset} is not the dataset repo the manifest names ({ds['repo_id']})")
        report.checks.insert(0, Check("download", FAILED, report.problems[0]))
    return report


def audit(target: str, public_key: Path | None = None, revision: str | None = None, endpoint: str | None = None,
          repo_root: Path | None = None, anchor: Anchor | None = None, dataset: str | None = None,
          model: str | None = None) -> AuditReport:
    """Audit `target` (module docstring: what it may be); `dataset`/`model` name the other half of a
    download that holds only one repo, as a folder or a Hub repo id."""
    anchor = anchor or Anchor(public_key=public_key, clone=repo_root)
    if endpoint is None:
        from pipeline.core.params import load_params

        endpoint = load_params().publish.endpoint if Path("params.yaml").is_file() else "https://huggingface.co"
    endpoint = endpoint.rstrip("/")
    path = Path(target)
    if model is not None:  # the target is a dataset download; the signed manifest comes with the model
        if not path.is_dir():
            raise AuditError(f"{target}: no such dataset folder")
        if not _is_repo_id(model):
            return check_bundle(Path(model), public_key, repo_root, dataset_dir=path, anchor=anchor)
        return audit_hub(model, revision or "main", endpoint, public_key, repo_root, anchor, dataset=str(path))
    if path.exists():
        if dataset is None or not _is_repo_id(dataset):
            return check_bundle(path, public_key, repo_root, anchor=anchor,
                                dataset_dir=Path(dataset) if dataset else None)
        return _dataset_repo(path, dataset, revision, endpoint, public_key, repo_root, anchor)
    if target.count("/") != 1 or target.startswith((".", "/")):
        raise AuditError(f"{target}: no such folder, and not a Hub repo id (namespace/name)")
    return audit_hub(target, revision or "main", endpoint, public_key, repo_root, anchor, dataset=dataset)


def exit_code(report: AuditReport) -> int:
    """0: consistent and the signer verified; 1: any mismatch; 3: consistent, but signed by an unanchored key."""
    if report.problems:
        return EXIT_FAILED
    return EXIT_UNANCHORED if report.unanchored or report.anchor is None else EXIT_PASSED


def verdict(report: AuditReport) -> str:
    return {EXIT_FAILED: "failed", EXIT_UNANCHORED: "unanchored", EXIT_PASSED: "passed"}[exit_code(report)]


def to_json(report: AuditReport, target: str) -> dict[str, Any]:
    """The audit as data, under JSON_SCHEMA (the module docstring documents every key)."""
    m = report.manifest or {}
    repos, code = m.get("repos") or {}, m.get("code") or {}
    release = {"version": m.get("version"), "commit": code.get("commit"), "dirty": code.get("dirty"),
               "model_repo": (repos.get(MODEL_DIR) or {}).get("repo_id"),
               "dataset_repo": (repos.get(DATASET_DIR) or {}).get("repo_id"),
               "created_at": m.get("created_at")} if m else None
    sig = (m.get("signing") or {})
    return {
        "schema_version": JSON_SCHEMA,
        "verdict": verdict(report),
        "exit_code": exit_code(report),
        "target": target,
        "release": release,
        "scope": {"model": report.manifest is not None, "dataset": report.dataset_checked},
        "anchor": {"kind": report.anchor_kind if report.anchor else None, "verified": report.anchor is not None,
                   "description": report.anchor,
                   "key_sha256": _key_sha256(report) or (None if report.anchor_kind == "sigstore"
                                                         else sig.get("public_key_sha256")),
                   "identity": None, "issuer": None} | (_identity(report.anchor) if report.anchor_kind == "sigstore"
                                                        else {}),
        "checks": [asdict(c) for c in report.checks],
        "problems": list(report.problems),
        "warnings": report.warnings,
        "lineage": report.graph,
    }


def _identity(anchor: str | None) -> dict[str, Any]:
    m = re.match(r"keyless Sigstore signer (\S+) \(issuer (\S+)\)", anchor or "")
    return {"identity": m.group(1), "issuer": m.group(2)} if m else {}


_TAGS = {PASSED: "ok  ", FAILED: "FAIL", SKIPPED: "skip"}


def print_report(report: AuditReport) -> int:
    """Each check on one line, the manifest's gate warnings, the tree and the verdict naming the anchor."""
    for c in report.checks:
        print(f"{_TAGS[c.status]}  {c.name}: {c.detail}")
    for w in report.warnings:
        print(f"warn  gate {w['gate']} ({w['status']}): {w['detail']}")
    if report.tree:
        print("\nlineage:\n" + report.tree + "\n")
    code = exit_code(report)
    version = (report.manifest or {}).get("version")
    scope = "" if report.dataset_checked else "; model repo only: the dataset was NOT checked (--dataset FOLDER|REPO)"
    warned = f"; {len(report.warnings)} release gate warning(s) above" if report.warnings else ""
    if report.problems:
        print(f"AUDIT FAILED: release {version}: {len(report.problems)} mismatch(es)")
        for p in report.problems:
            print(f"  - {p}")
    elif code == EXIT_UNANCHORED:
        print(f"AUDIT INCOMPLETE: release {version} is consistent with its manifest and the signature is valid, but "
              f"the signer is NOT verified (no trust anchor; the key inside the release has sha256 "
              f"{_key_sha256(report)}){scope}{warned}; exit 3")
    else:
        print(f"AUDIT PASSED: release {version} is consistent with its signed manifest; signer: {report.anchor}"
              f"{scope}{warned}")
    return code


def _cmd_audit(args: argparse.Namespace) -> int:
    if bool(args.identity) != bool(args.issuer):
        raise AuditUsageError("keyless verification needs both --identity and --issuer")
    chosen = [n for n, on in (("--public-key", args.public_key), ("--repo-key", args.repo_key),
                              ("--identity/--issuer", args.identity)) if on]
    if len(chosen) > 1:
        raise AuditUsageError(f"give one trust anchor, not {' and '.join(chosen)}")
    if args.dataset and args.model:
        raise AuditUsageError("give --dataset (the target is a model download) or --model (the target is a "
                              "dataset download), not both")
    clone = args.clone or (Path.cwd() if (Path.cwd() / ".git").exists() else None)
    anchor = Anchor(public_key=args.public_key, repo_key=args.repo_key, clone=clone, identity=args.identity,
                    issuer=args.issuer, trust_config=args.sigstore_trust_config)
    report = audit(args.target, args.public_key, args.revision, args.endpoint, clone, anchor,
                   dataset=args.dataset, model=args.model)
    code = print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(report, args.target), indent=2))
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
    p.add_argument("--dataset", default=None, metavar="FOLDER|REPO",
                   help="the dataset download (folder) or Hub dataset repo id that goes with a model-only "
                        "download; without it a model download is checked alone, and says so")
    p.add_argument("--model", default=None, metavar="FOLDER|REPO",
                   help="when the target is a dataset download: the model download or Hub model repo id that "
                        "holds the signed manifest")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the verdict, release, anchor, every check and the lineage tree to FILE "
                        "(schema openrelease.audit/1, documented in pipeline/release/audit.py)")
    p.set_defaults(func=_cmd_audit)
