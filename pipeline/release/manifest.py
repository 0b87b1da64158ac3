"""The release manifest: every published file with its sha256 and size, the lineage records of every
stage, dvc.lock's stage hashes, the code (commit + source archive) and the environment.

It travels in the model repo as `manifest.json` beside the weights and is covered by the signature
(`model.sig`), so the signature transitively covers the dataset repo's files too.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.lineage import sha256_file, sha256_json
from pipeline.release.signing import PUBLIC_KEY_FILE, SIGNATURE_FILE

SCHEMA = "openrelease.manifest/1"
MANIFEST_FILE = "manifest.json"
BOM_FILE = "bom.cdx.json"
MODEL_DIR, DATASET_DIR = "model", "dataset"
# Files of the model repo that the manifest cannot list: itself and the signature over it.
UNLISTED = frozenset({MANIFEST_FILE, SIGNATURE_FILE})
# Hub-side files that are not part of a release (the Hub adds .gitattributes on its own).
HUB_EXTRAS = frozenset({".gitattributes"})


@dataclass
class ReleaseInfo:
    """Who and what a release is: its version, where it goes, and the commit it is built from."""

    version: str
    model_repo: str
    dataset_repo: str
    endpoint: str
    commit: str
    dirty: bool
    version_from: str = "given"
    remote: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def release_files(folder: Path) -> list[Path]:
    """Every file under a repo folder in path order, hidden (dot) files included: what is uploaded is
    what is listed and audited, so a `.something` cannot ride along unlisted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink())


def file_entries(folder: Path, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """{path, sha256, size} for every file under `folder`, in path order."""
    out = []
    for p in release_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel not in exclude:
            out.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
    return out


def environment() -> dict[str, Any]:
    """Python, platform and every installed distribution's version (what `pip freeze` would pin)."""
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            packages[name.lower()] = dist.version
    return {"python": platform.python_version(), "implementation": sys.implementation.name,
            "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
            "packages": dict(sorted(packages.items()))}


def with_run_facts(lineage: dict[str, dict], runs: dict[str, dict]) -> dict[str, dict]:
    """Each lineage record as written, plus `git` and `mlflow` from the run record that belongs to it
    (the record files carry no run facts, so that they stay byte-stable DVC outputs)."""
    out = {}
    for stage, rec in lineage.items():
        run = runs.get(stage) or {}
        out[stage] = {**rec, **{k: run[k] for k in ("git", "mlflow") if k in run}}
    return out


def build_manifest(*, info: ReleaseInfo, bundle: Path, lineage: dict[str, dict], dvc_stages: dict[str, dict],
                   dvc_lock_sha256: str | None, archive: Path, license: dict[str, Any],
                   gates: list[dict[str, Any]], public_key_sha256: str | None, params: dict[str, Any],
                   method: str = "key", repo_public_key: str | None = None,
                   runs: dict[str, dict] | None = None, runs_missing: list[str] | None = None) -> dict[str, Any]:
    """The manifest dict for the bundle laid out under `bundle/model` and `bundle/dataset`.

    `runs` are the run records (pipeline.core.runs) read at publish time: times, host, commit, dirty
    flag and MLflow ids of the build; `runs_missing` says for which stages there was none (outputs that
    came from `dvc pull` carry no run facts)."""
    runs = runs or {}
    lineage = with_run_facts(lineage, runs)
    model, dataset = bundle / MODEL_DIR, bundle / DATASET_DIR
    archive_rel = archive.relative_to(model).as_posix()
    return {
        "schema": SCHEMA,
        "version": info.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "repos": {
            "model": {"repo_id": info.model_repo, "repo_type": "model", "revision": info.version},
            "dataset": {"repo_id": info.dataset_repo, "repo_type": "dataset", "revision": info.version},
            "endpoint": info.endpoint,
        },
        "files": {"model": file_entries(model, UNLISTED), "dataset": file_entries(dataset)},
        "code": {
            "commit": info.commit, "dirty": info.dirty, "version_from": info.version_from, "remote": info.remote,
            "archive": {"path": archive_rel, "sha256": sha256_file(archive), "size": archive.stat().st_size},
        },
        "dvc": {"lock_sha256": dvc_lock_sha256, "stages": dvc_stages},
        "lineage": lineage,
        "mlflow": {stage: rec.get("mlflow", {}) for stage, rec in lineage.items()},
        "runs": runs,
        "runs_missing": list(runs_missing or []),
        "params": params,
        "params_sha256": sha256_json(params),
        "license": license,
        "gates": gates,
        "signing": {"library": f"model-signing {_version('model-signing')}",
                    "method": "elliptic-curve key" if method == "key" else "sigstore (keyless)",
                    "signature": SIGNATURE_FILE, "public_key": PUBLIC_KEY_FILE if method == "key" else None,
                    "public_key_sha256": public_key_sha256, "repo_public_key": repo_public_key, "covers": f"every file of the {MODEL_DIR} repo but "
                    f"{SIGNATURE_FILE}; the dataset repo through the sha256 listed here"},
        "environment": environment(),
    }


_ABSOLUTE = re.compile(r"^(?:/|~[/\\]|[A-Za-z]:[/\\]|file:/|sqlite:////)")


def scrub_local_paths(obj: Any, root: Path) -> Any:
    """A copy of `obj` naming no absolute local path: paths under `root` become relative to it, any other
    absolute path (a home folder, /tmp, a cache) becomes `<local>/NAME`. A release is read on other
    machines; where it was built says nothing to them and can say too much about the builder."""
    root_s, home = str(Path(root).resolve()), os.path.expanduser("~")

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if not isinstance(v, str):
            return v
        v = v.replace(root_s + "/", "").replace(root_s, ".")
        if home and home != "/":
            v = v.replace(home + "/", "~/")
        if _ABSOLUTE.match(v) or v.startswith("~/"):
            name = re.split(r"[/\\]", v.rstrip("/\\"))[-1]
            return f"<local>/{name}"
        return v
    return clean(obj)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
