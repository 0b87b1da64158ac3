"""`openrelease sweep` end to end on the tiny config: a 2 x 2 grid through real `dvc exp run --queue` and
`dvc queue start`, then the winner released and audited. Several minutes on 2 cores: slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.lineage import sha256_file
from tests.conftest import shared_data
from tests.helpers import configure_tiny, edit_params, env_for, git, make_project_copy

pytestmark = pytest.mark.slow


def _openrelease(project: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "openrelease"), *args], cwd=project,
                          env=env_for(project), capture_output=True, text=True, timeout=timeout)


def test_sweep_2x2_through_the_dvc_queue_then_release_and_audit(tiny_model_dir, tmp_path):
    pairs = shared_data("llama-factory", "dpo_en_demo.json")
    project = make_project_copy(tmp_path / "proj")
    configure_tiny(project, tiny_model_dir, pairs)
    edit_params(
        project,
        sweep={"axes": {"train.dpo.beta": [0.05, 0.2]}, "seeds": [1, 2], "jobs": 1,
               "headline": ["pref_accuracy", "reward_margin"],
               "selection": {"metric": "pref_accuracy", "goal": "maximise", "constraints": [],
                             "tie_break": ["reward_margin max"], "null_value": 0.5, "alpha": 0.05}},
    )
    git(project, "commit", "-qam", "tiny config")
    git(project, "tag", "v0.0.1")

    printed = _openrelease(project, "sweep", "--print-members")
    assert printed.returncode == 0 and len(printed.stdout.splitlines()) == 4, printed.stderr
    result = _openrelease(project, "sweep")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])

    table = json.loads((project / "reports" / "sweep" / "table.json").read_text())
    assert len(table["members"]) == 4 and len(table["configs"]) == 2
    assert all(r["mlflow_run_id"] for r in table["members"]), table["members"]
    assert all(r["params_ran"]["train.dpo.seed"] == r["seed"] for r in table["members"])
    assert table["reference_passes"] == 1, [r["train"] for r in table["members"]]
    assert (project / "metrics" / "sweep.json").is_file()
    assert list((project / "reports" / "sweep").glob("*.png"))
    w = table["winner"]
    train = json.loads((project / "lineage" / "train.json").read_text())["params"]["train"]["dpo"]
    assert train["beta"] == w["config"]["train.dpo.beta"] and train["seed"] == 1
    card = (project / "release" / "model" / "README.md").read_text()
    assert "## Sweep" in card and "Holm-adjusted" in card and table["members"][1]["name"] in card
    manifest = json.loads((project / "release" / "model" / "manifest.json").read_text())
    assert manifest["sweep"]["sha256"] == sha256_file(project / "release" / "model" / "sweep" / "table.json")

    audit = _openrelease(project, "audit", "release", timeout=600)
    assert audit.returncode == 0, (audit.stdout[-3000:], audit.stderr[-3000:])
    assert "the rule (maximise pref_accuracy" in audit.stdout
