"""Hashing and per-stage lineage records.

A lineage record is a small JSON file per stage: what it read and wrote (path, sha256, size, row
count where it applies), the params it read, the sha256 of the stage's code and library versions.
It is a DVC output, so it holds nothing that differs between two clean runs of one commit: the git
commit, the dirty flag, times, hosts and MLflow run ids are in the run record (pipeline.core.runs).
Later stages and the release manifest are built from these records.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
# Versions recorded in every lineage record: what makes a stage's output reproducible.
TRACKED_PACKAGES = (
    "open-release", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "dvc", "mlflow",
    "great-expectations", "huggingface-hub", "gguf", "safetensors", "numpy", "pyarrow",
)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def dir_files(path: str | Path) -> list[Path]:
    """Files under a folder in a stable order, skipping hidden temporaries."""
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder as the digest of its sorted `relpath sha256` listing."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n" for p in dir_files(path))
    return sha256_bytes(listing.encode())


def size_of(path: str | Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in dir_files(path))


@dataclass
class Artifact:
    """One file or folder a stage read or wrote."""

    path: str
    sha256: str
    size: int
    rows: int | None = None
    files: dict[str, str] | None = None  # relpath -> sha256, for folders

    @classmethod
    def of(cls, path: str | Path, rows: int | None = None, root: str | Path = ".") -> Artifact:
        p = Path(path)
        rel = _relative(p, root)
        files = None
        if p.is_dir():
            files = {f.relative_to(p).as_posix(): sha256_file(f) for f in dir_files(p)}
        return cls(path=rel, sha256=sha256_path(p), size=size_of(p), rows=rows, files=files)


def _relative(p: Path, root: str | Path) -> str:
    try:
        return p.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(p)


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """The commit at HEAD and whether the tree differs from it (None outside a git repo).

    Dirty means a tracked file differs from HEAD; dvc.lock and the outputs it lists do not count:
    DVC rewrites them during every `dvc repro`, so counting them would mark every stage dirty.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain=v1", "-z", "--untracked-files=no")
    if status is None:
        return {"commit": commit.strip() if commit else None, "dirty": None}
    changed = changed_paths(status)
    managed = dvc_managed_paths(Path(root))
    dirty = [p for p in changed if not is_managed(p, managed)]
    return {"commit": commit.strip() if commit else None, "dirty": bool(dirty)}


def changed_paths(porcelain_z: str) -> list[str]:
    """Paths from `git status --porcelain=v1 -z` (both sides of a rename)."""
    out, entries = [], porcelain_z.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        out.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy: the source path follows as its own entry
            out.append(entries[i])
            i += 1
    return out


def dvc_managed_paths(root: Path) -> set[str]:
    """dvc.lock files and every output path their stages list (resolved paths, no templating)."""
    import yaml

    managed: set[str] = set()
    for lock in [root / "dvc.lock"]:
        if not lock.is_file():
            continue
        managed.add(lock.relative_to(root).as_posix())
        try:
            data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        for st in (data.get("stages") or {}).values() if isinstance(data, dict) else []:
            for out in (st or {}).get("outs") or []:
                if isinstance(out, dict) and out.get("path"):
                    managed.add(Path(out["path"]).as_posix().rstrip("/"))
    return managed


def is_managed(path: str, managed: set[str]) -> bool:
    """True for dvc.lock and the outputs DVC manages (a change there is a run's result, not a code change)."""
    return Path(path).name == "dvc.lock" or any(path == m or path.startswith(m + "/") for m in managed)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class LineageRecord:
    stage: str
    params: dict[str, Any]
    params_digest: str
    inputs: list[Artifact] = field(default_factory=list)
    outputs: list[Artifact] = field(default_factory=list)
    code: dict[str, Any] = field(default_factory=dict)   # {"module", "sha256"}: the stage's import closure
    versions: dict[str, str] = field(default_factory=library_versions)
    extra: dict[str, Any] = field(default_factory=dict)
    platform: str = field(default_factory=lambda: f"{platform.system()}-{platform.machine()} ({sys.implementation.name})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LineageRecord:
        """Read a record; keys of older records that moved to the run record (git, mlflow, times) are dropped."""
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in known}
        d["inputs"] = [Artifact(**a) for a in d.get("inputs", [])]
        d["outputs"] = [Artifact(**a) for a in d.get("outputs", [])]
        return cls(**d)


def read_record(lineage_dir: str | Path, stage: str) -> LineageRecord:
    from pipeline.core.io import read_json

    return LineageRecord.from_dict(read_json(Path(lineage_dir) / f"{stage}.json"))
