"""Dirty means dirty (issue 22): a tree whose only changes are dvc.lock and the outputs it lists is
clean in the release (card, manifest, git-clean gate), as it is in the run records."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.core.lineage import git_state
from pipeline.core.params import load_params
from pipeline.release import gates as G
from pipeline.release.bundle import release_info
from pipeline.release.gitinfo import code_state
from tests.release_fixture import GIT, ROOT


def _git(root: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "metrics").mkdir(parents=True)
    (root / "src.py").write_text("x = 1\n")
    (root / "metrics" / "eval.json").write_text('{"a": 1}\n')   # a git-tracked DVC output (cache: false)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate": {
        "cmd": "python -m pipeline.stages.evaluate", "outs": [{"path": "metrics/eval.json", "md5": "0" * 32}]}}}))
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    return root


def _states(root: Path):
    code = code_state(root, None, "^v")
    info = release_info(load_params(ROOT / "params.yaml"), code)
    return code, info, git_state(root)


def test_dvc_lock_and_its_outputs_changed_is_clean_everywhere(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"]["evaluate"]["outs"][0]["md5"] = "1" * 32
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "metrics" / "eval.json").write_text('{"a": 2}\n')
    code, info, run_record = _states(repo)
    assert code.dirty == [] and info.dirty is False and run_record["dirty"] is False
    assert G.git_clean(code).status == "pass"


def test_a_changed_source_file_is_dirty_everywhere(repo):
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "\n")
    (repo / "src.py").write_text("x = 2\n")
    code, info, run_record = _states(repo)
    assert [ln[3:] for ln in code.dirty] == ["src.py"]      # dvc.lock is not listed, the source file is
    assert info.dirty is True and run_record["dirty"] is True
    assert G.git_clean(code).status == "fail"


def test_an_untracked_file_is_dirty_in_the_release(repo):
    (repo / "notes.txt").write_text("forgotten\n")
    code, info, _ = _states(repo)
    assert [ln[3:] for ln in code.dirty] == ["notes.txt"] and info.dirty is True


def test_a_renamed_file_is_dirty(repo):
    _git(repo, "mv", "src.py", "lib.py")
    code, _, run_record = _states(repo)
    assert len(code.dirty) == 1 and code.dirty[0].startswith("R") and run_record["dirty"] is True
