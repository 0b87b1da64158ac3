"""The two layout rules of shared/DESIGN.md, as functions over a source tree (so a test can plant a
violation in a fixture tree instead of editing the package).

- Imports point down: stages use wings, wings use core, nothing imports a stage, and a wing reaches a
  sibling only where ALLOWED says so, and then only through public (non-underscore) names.
- A DVC stage's deps cover every pipeline module its command imports, transitively.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from pipeline.core.imports import module_path, transitive_imports

# wing -> the wings it may import (besides itself). `root` is pipeline/__init__.py, `cli` the CLI.
ALLOWED = {
    "root": set(),
    "core": {"root"},
    "constraints": {"core", "root"},
    "lm": {"core", "root"},
    "data": {"core", "lm", "root"},
    "train": {"core", "lm", "root"},
    "eval": {"core", "lm", "constraints", "root"},
    "release": {"core", "root"},
    # the sweep orchestrates DVC experiments; release reads its output files, never the wing
    "sweep": {"core", "root"},
    "stages": {"core", "data", "constraints", "lm", "train", "eval", "release", "sweep", "root"},
    "cli": {"core", "eval", "release", "sweep", "root"},
}


def wing_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1]


def _modules(root: Path) -> list[str]:
    pkg = root / "pipeline"
    mods = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def import_violations(root: Path) -> list[str]:
    """One line per import that breaks the direction rules, with file:line."""
    out = []
    for mod in _modules(root):
        src_wing = wing_of(mod)
        path = module_path(mod, root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [(node.module, [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            else:
                continue
            for target, names in targets:
                if target != "pipeline" and not target.startswith("pipeline."):
                    continue
                mods = [target]
                if target == "pipeline":  # `from pipeline import x`: x is the module imported
                    mods = [f"pipeline.{n}" if module_path(f"pipeline.{n}", root) else "pipeline" for n in names]
                    names = [n for n in names if not module_path(f"pipeline.{n}", root)]
                for tmod in mods:
                    dst_wing = wing_of(tmod)
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    if dst_wing == "stages" and src_wing != "cli":
                        out.append(f"{where}: {mod} imports stage module {tmod} (nothing imports a stage)")
                    elif dst_wing != src_wing and dst_wing not in ALLOWED.get(src_wing, set()):
                        out.append(f"{where}: {src_wing} may not import {dst_wing} ({mod} -> {tmod})")
                    elif dst_wing != src_wing:
                        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
                        private += [p for p in tmod.split(".") if p.startswith("_") and p != "__init__"]
                        if private:
                            out.append(f"{where}: {mod} uses private {', '.join(private)} of {tmod}")
    return out


_STAGE_CMD = re.compile(r"python -m (pipeline\.stages\.\w+)")


def uncovered_imports(root: Path, dvc_yaml: Path | None = None) -> list[str]:
    """One line per (stage, module file) whose file no `deps` entry of the stage covers."""
    spec = yaml.safe_load((dvc_yaml or root / "dvc.yaml").read_text(encoding="utf-8"))
    out = []
    for name, stage in spec.get("stages", {}).items():
        stage = stage.get("do", stage)  # a foreach stage: its body
        m = _STAGE_CMD.search(str(stage.get("cmd", "")))
        if not m:
            continue
        deps = [str(d if isinstance(d, str) else next(iter(d))).rstrip("/") for d in stage.get("deps", [])]
        for mod in transitive_imports(m.group(1), root):
            rel = module_path(mod, root).relative_to(root).as_posix()
            if not any(rel == d or rel.startswith(d + "/") for d in deps):
                out.append(f"dvc.yaml: stage {name} imports {mod} but no dep covers {rel}")
    return out
