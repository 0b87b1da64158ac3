"""The package's own import graph, read with `ast` (nothing is imported to compute it).

Two rules rest on it: a stage's DVC deps must cover every pipeline module it imports (tested), and a
cache key or resume fingerprint names the sha256 of exactly the source files that compute its value,
found from the imports rather than from a list kept by hand.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "pipeline"


def package_root() -> Path:
    """The folder that holds the `pipeline` package."""
    return Path(__file__).resolve().parents[2]


def module_path(module: str, root: Path | None = None) -> Path | None:
    """The file of a dotted module name (a package's `__init__.py`), or None if there is none."""
    base = (root or package_root()).joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _parents(module: str) -> list[str]:
    """`pipeline.eval.stats` -> [`pipeline`, `pipeline.eval`]: importing a module runs its packages."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def direct_imports(module: str, root: Path | None = None) -> set[str]:
    """Pipeline modules that `module` imports anywhere in its body (function-level imports count)."""
    root = root or package_root()
    path = module_path(module, root)
    if path is None:
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [target]
            # `from pipeline.x import y` imports the submodule y when there is one
            names += [f"{target}.{a.name}" for a in node.names if module_path(f"{target}.{a.name}", root)]
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                while name and module_path(name, root) is None:  # `pipeline.x.attr` -> `pipeline.x`
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
                    found.update(_parents(name))
    found.discard(module)
    return found


def transitive_imports(module: str, root: Path | None = None) -> list[str]:
    """`module`, its packages and every pipeline module reachable from it, sorted."""
    root = root or package_root()
    seen, todo = set(), [module, *_parents(module)]
    while todo:
        m = todo.pop()
        if m in seen or module_path(m, root) is None:
            continue
        seen.add(m)
        todo.extend(direct_imports(m, root) - seen)
    return sorted(seen)


def _code_sha256(module: str, root: Path) -> tuple[str, tuple[tuple[str, str], ...]]:
    files = []
    for m in transitive_imports(module, root):
        path = module_path(m, root)
        files.append((path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()))
    digest = hashlib.sha256("".join(f"{f} {h}\n" for f, h in files).encode()).hexdigest()
    return digest, tuple(files)


def stage_code(module: str) -> dict[str, str]:
    """A lineage record's `code`: the module and the sha256 of its import closure. For the records of
    foreach stages (`<stage>.<item>`), whose names are not module names."""
    return {"module": module, "sha256": code_sha256(module)}


def code_sha256(*modules: str, root: Path | None = None) -> str:
    """One sha256 over the source of `modules` and everything they import within the package."""
    root = (root or package_root()).resolve()
    parts = [_code_sha256(m, root)[0] for m in sorted(modules)]
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def code_files(module: str, root: Path | None = None) -> dict[str, str]:
    """Relative path -> sha256 of each source file in `module`'s import closure (for lineage)."""
    root = (root or package_root()).resolve()
    return dict(_code_sha256(module, root)[1])
