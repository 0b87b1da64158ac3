"""The layout rules hold for the package, and each rule catches a violation planted in a fixture tree."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tests.layout_rules import import_violations, uncovered_imports

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down_in_the_package():
    assert import_violations(ROOT) == []


def test_every_stage_depends_on_what_it_imports():
    assert uncovered_imports(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, body in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(body))
    return tmp_path


@pytest.fixture
def fixture_tree(tmp_path):
    return _tree(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/core/__init__.py": "",
        "pipeline/core/io.py": "def write(): ...\ndef _secret(): ...\n",
        "pipeline/lm/__init__.py": "",
        "pipeline/lm/loading.py": "from pipeline.core.io import write\n",
        "pipeline/eval/__init__.py": "",
        "pipeline/eval/stats.py": "from pipeline.lm.loading import write\n",
        "pipeline/stages/__init__.py": "",
        "pipeline/stages/evaluate.py": "from pipeline.eval import stats\n",
        "dvc.yaml": """\
            stages:
              evaluate:
                cmd: python -m pipeline.stages.evaluate
                deps:
                  - pipeline/__init__.py
                  - pipeline/core
                  - pipeline/lm
                  - pipeline/eval
                  - pipeline/stages/__init__.py
                  - pipeline/stages/evaluate.py
            """,
    })


def test_fixture_tree_is_clean(fixture_tree):
    assert import_violations(fixture_tree) == []
    assert uncovered_imports(fixture_tree) == []


@pytest.mark.parametrize("rel, body, expected", [
    ("pipeline/core/io.py", "def write():\n    from pipeline.eval import stats\n", "core may not import eval"),
    ("pipeline/lm/loading.py", "from pipeline.stages import evaluate\n", "imports stage module"),
    ("pipeline/lm/loading.py", "from pipeline.eval.stats import write\n", "lm may not import eval"),
    ("pipeline/lm/loading.py", "from pipeline.core.io import _secret\n", "uses private _secret"),
])
def test_planted_import_violation_is_caught(fixture_tree, rel, body, expected):
    (fixture_tree / rel).write_text(body)
    found = import_violations(fixture_tree)
    assert len(found) == 1 and expected in found[0] and rel in found[0], found


def test_planted_missing_dep_is_caught(fixture_tree):
    # a function-level import of a module in a folder the stage does not list
    _tree(fixture_tree, {"pipeline/train/__init__.py": "", "pipeline/train/report.py": ""})
    (fixture_tree / "pipeline/eval/stats.py").write_text("def f():\n    from pipeline.train import report\n")
    found = uncovered_imports(fixture_tree)
    assert any("pipeline/train/report.py" in f for f in found), found
    shutil.rmtree(fixture_tree / "pipeline/train")
    (fixture_tree / "pipeline/eval/stats.py").write_text("")
    assert uncovered_imports(fixture_tree) == []


def test_missing_dep_inside_a_foreach_body_is_caught(fixture_tree):
    (fixture_tree / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          per_item:
            foreach: [a, b]
            do:
              cmd: python -m pipeline.stages.one ${item}
              deps: [pipeline/stages/one.py]
    """))
    (fixture_tree / "pipeline/stages/__init__.py").touch()
    (fixture_tree / "pipeline/stages/one.py").write_text("from pipeline.core.io import write\n")
    assert any("stage per_item imports pipeline.core" in line for line in uncovered_imports(fixture_tree))
