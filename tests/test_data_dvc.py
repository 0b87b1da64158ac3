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
    for stage in ("ingest_source@0", "ingest", "decontam_own", "validate", "build"):
        result = dvc(project, "repro", "--single-item", stage)
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "data.json").read_text())
    assert metrics["read"] == 20 and metrics["pairs_train"] + metrics["pairs_test"] == 20
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in ("ingest_source@0", "ingest", "validate", "build"))
    assert "outputs/rated.jsonl" in lock  # the default on-policy source is a DVC dependency
    status = dvc(project, "status", "ingest_source@0", "ingest", "validate", "build")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout

    with rated.open("a") as f:
        f.write('{"instruction": "cut short", "completions": [\n')
    failed = dvc(project, "repro", "--single-item", "ingest_source@0")
    assert failed.returncode != 0
    assert "ingest_source.on-policy: error: " in failed.stderr and "rated.jsonl:21: valid JSON" in failed.stderr
    assert "Traceback" not in failed.stderr


UF = [{"id": f"u{i}", "instruction": f"Name a colour number {i}.", "completions": [
    {"model": "m", "response": f"Colour {i} is red.", "annotations": {"instruction_following": {"Rating": "5"}}},
    {"model": "m", "response": f"no {i}", "annotations": {"instruction_following": {"Rating": "1"}}}]}
    for i in range(8)]


@pytest.mark.slow
def test_every_source_and_set_is_a_dvc_dependency_and_ultrafeedback_only_runs_no_generation(tmp_path, tiny_model_dir):
    """Sources and decontamination sets are deps of their own stages; editing a source file, a set file
    or a shared module shows in `dvc status`; with no on-policy source, `publish`'s graph has no
    generate or rate, so `dvc repro publish` runs neither."""
    from pipeline.core.lineage import sha256_file

    project = make_project_copy(tmp_path / "proj")
    default_dag = dvc(project, "dag", "publish")
    assert "generate" in default_dag.stdout and "rate" in default_dag.stdout  # the default on-policy source
    (project / "data" / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in UF))
    (project / "data" / "bench.jsonl").write_text(json.dumps({"id": "b1", "prompt": "Name a colour number 3."}) + "\n")
    edit_params(project, paths={"base_model": str(tiny_model_dir)},
                data={"sources": [{"name": "uf", "format": "ultrafeedback", "path": "data/uf.jsonl", "license": "MIT"}],
                      "decontaminate_against": [{"name": "bench", "path": "data/bench.jsonl", "field": "prompt"}]},
                validate={"max_quarantine_fraction": 0.5})
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "uf only"], cwd=project,
                   check=True)
    dag = dvc(project, "dag", "publish")  # exactly the stages `dvc repro publish` runs
    assert dag.returncode == 0, dag.stderr
    assert "generate" not in dag.stdout and "rate" not in dag.stdout
    assert all(s in dag.stdout for s in ("ingest_source@0", "decontam_set@0", "decontam_own", "build"))

    stages = ("ingest_source@0", "ingest", "decontam_set@0", "decontam_own", "validate", "build")
    for stage in stages:
        result = dvc(project, "repro", "--single-item", stage)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
    assert dvc(project, "status", *stages).stdout.strip() in ("", "Data and pipelines are up to date.")
    lock = (project / "dvc.lock").read_text()
    assert "data/uf.jsonl" in lock and "data/bench.jsonl" in lock

    def changed() -> set[str]:
        out = dvc(project, "status", *stages).stdout
        return {line.rstrip(":") for line in out.splitlines() if line and not line.startswith((" ", "\t"))}

    with (project / "data" / "uf.jsonl").open("a") as f:
        f.write(json.dumps({**UF[0], "id": "u99", "instruction": "One more."}) + "\n")
    assert changed() == {"ingest_source@0"}
    dvc(project, "repro", "--single-item", "ingest_source@0")
    assert "ingest" in changed() and "ingest_source@0" not in changed()  # the change travels down
    with (project / "data" / "bench.jsonl").open("a") as f:
        f.write(json.dumps({"id": "b2", "prompt": "Another benchmark question."}) + "\n")
    assert "decontam_set@0" in changed()
    before = sha256_file(project / "outputs" / "decontam_sets" / "bench.json")
    dvc(project, "repro", "--single-item", "decontam_set@0")
    assert sha256_file(project / "outputs" / "decontam_sets" / "bench.json") != before and "build" in changed()
    shared = project / "pipeline" / "core" / "io.py"  # a module every data stage imports
    shared.write_text(shared.read_text() + "\n# edited\n")
    assert {"ingest_source@0", "decontam_own", "validate", "build"} <= changed()
