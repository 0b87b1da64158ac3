"""The parts every cache key and resume fingerprint shares, and a readable diff of two keys.

A cached value or a checkpoint is reused only when its key equals the key of a recomputation: the
inputs' hashes, the parameters that change the value, the library versions, the device and precision,
and the sha256 of the code that computes it (`pipeline.core.imports.code_sha256`, from the imports).
`key_diff` says which part differs, so a miss or a refused resume names its reason.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

# The libraries whose code computes model outputs in this project.
MODEL_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate")


def library_versions(*packages: str) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for pkg in packages or MODEL_LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def code_part(*modules: str) -> str:
    """sha256 of `modules` and their whole pipeline import closure."""
    from pipeline.core.imports import code_sha256

    return code_sha256(*modules)


def key_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like keys differ, each as `path: old -> new` (values shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += key_diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.') or '<key>'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:18] + "..." + s[-18:]
