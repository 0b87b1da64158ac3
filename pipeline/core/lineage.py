"""Hashing and per-stage lineage records.

A lineage record is a small JSON file per stage: what it read and wrote (path, sha256, size, row
count where it applies), the params it read, the git commit, library versions and its MLflow run id.
Later stages and the release manifest are built from these records.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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
    """The commit at HEAD and whether the working tree differs from it (None outside a git repo)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


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
    git: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    mlflow: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    platform: str = field(default_factory=lambda: f"{platform.system()}-{platform.machine()} ({sys.implementation.name})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LineageRecord:
        d = dict(d)
        d["inputs"] = [Artifact(**a) for a in d.get("inputs", [])]
        d["outputs"] = [Artifact(**a) for a in d.get("outputs", [])]
        return cls(**d)


def read_record(lineage_dir: str | Path, stage: str) -> LineageRecord:
    from pipeline.core.io import read_json

    return LineageRecord.from_dict(read_json(Path(lineage_dir) / f"{stage}.json"))
