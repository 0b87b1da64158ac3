"""`dvc repro` of ingest -> validate -> build in a fresh copy of the project (slow: three stage processes)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import dvc, edit_params, make_project_copy


@pytest.mark.slow
def test_dvc_repro_data_stages(tmp_path, tiny_model_dir):
    project = make_project_copy(tmp_path / "proj")
    edit_params(project, paths={"base_model": str(tiny_model_dir)})
    rated = project / "outputs" / "rated.jsonl"  # what `rate` writes; generate/rate are not run here
    rated.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"p{i}", "instruction": f"Describe the colour number {i} in one line.", "completions": [
        {"model": "base", "response": f"Colour {i} is bright.", "annotations": {"instruction_following": {"Rating": "5"}}},
        {"model": "base", "response": f"colour {i}", "annotations": {"instruction_following": {"Rating": "2"}}}]}
        for i in range(20)]
    rated.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qam", "tiny params"],
                   cwd=project, check=True)
    for stage in ("ingest", "validate", "build"):
        result = dvc(project, "repro", "--single-item", stage)
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "data.json").read_text())
    assert metrics["read"] == 20 and metrics["pairs_train"] + metrics["pairs_test"] == 20
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in ("ingest", "validate", "build"))
    assert "outputs/rated.jsonl" in lock  # the default on-policy source is a DVC dependency
    status = dvc(project, "status", "ingest", "validate", "build")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout

    with rated.open("a") as f:
        f.write('{"instruction": "cut short", "completions": [\n')
    failed = dvc(project, "repro", "--single-item", "ingest")
    assert failed.returncode != 0
    assert "ingest: error: " in failed.stderr and "rated.jsonl:21: valid JSON" in failed.stderr
    assert "Traceback" not in failed.stderr
