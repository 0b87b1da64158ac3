"""`openrelease sweep` end to end on the tiny config: a 2 x 2 grid through real `dvc exp run --queue` and
`dvc queue start`, then the winner released and audited; then what CI does: the record and dvc.lock
committed and tagged, `dvc push`, a fresh clone of the tag, `dvc pull`, a release from the pulled
outputs that carries the sweep table, audited against params.yaml at the tag; an edited table is
refused. Several minutes on 2 cores: slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.lineage import sha256_file
from tests.conftest import shared_data
from tests.helpers import configure_tiny, dvc, edit_params, env_for, git, make_project_copy

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
               "headline": ["pass_rate_delta", "pref_accuracy", "reward_margin"],
               "selection": {"metric": "dev_pass_rate_delta", "goal": "maximise", "constraints": [],
                             "tie_break": ["kl min"], "null_value": 0.0, "alpha": 0.05}},
    )
    git(project, "commit", "-qam", "tiny config")

    printed = _openrelease(project, "sweep", "--print-members")
    assert printed.returncode == 0 and len(printed.stdout.splitlines()) == 4, printed.stderr
    result = _openrelease(project, "sweep")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])

    table = json.loads((project / "reports" / "sweep" / "table.json").read_text())
    assert len(table["members"]) == 4 and len(table["configs"]) == 2
    record = project / "sweeps" / f"{table['sweep_id']}.json"
    assert json.loads(record.read_text())["members"] == table["members"]  # the table is built from the record
    assert table["winner"]["configs_tried"] == 2 and table["winner"]["selected_on"] == "dev"
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

    assert manifest["params"]["sweep"]["selection"]["metric"] == "dev_pass_rate_delta"  # signed with the release
    key = ".openrelease/keys/signing-key.pub"
    audit = _openrelease(project, "audit", "release", "--public-key", key, timeout=600)
    assert audit.returncode == 0, (audit.stdout[-3000:], audit.stderr[-3000:])
    assert "the rule (maximise dev_pass_rate_delta" in audit.stdout

    # CI: commit the record and the lock, push, tag; a fresh clone of the tag restores the table by dvc pull
    storage = tmp_path / "dvc-storage"
    for args in (("remote", "add", "-d", "local", str(storage)), ("push",)):
        r = dvc(project, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    git(project, "add", "-A")
    git(project, "commit", "-qm", "sweep release v0.0.1")
    git(project, "tag", "v0.0.1")
    clone = tmp_path / "ci"
    subprocess.run(["git", "clone", "-q", "--branch", "v0.0.1", str(project), str(clone)], check=True)
    assert not (clone / "reports" / "sweep").exists() and (clone / "sweeps" / record.name).is_file()
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert (clone / "reports" / "sweep" / "table.json").read_bytes() == \
        (project / "reports" / "sweep" / "table.json").read_bytes()
    bundle = tmp_path / "bundle"
    released = _openrelease(clone, "publish", "--dry-run", "--to", str(bundle))
    assert released.returncode == 0, (released.stdout[-3000:], released.stderr[-3000:])
    card = (bundle / "model" / "README.md").read_text()
    assert "No sweep was run" not in card and "The pick on the **test** prompts" in card
    audited = _openrelease(clone, "audit", str(bundle), "--clone", str(clone), "--public-key",
                           str(clone / key), timeout=600)
    assert audited.returncode == 0, (audited.stdout[-3000:], audited.stderr[-3000:])
    assert "AUDIT PASSED" in audited.stdout and "params.yaml at tag v0.0.1" in audited.stdout

    # an edited sweep table is refused
    shipped = bundle / "model" / "sweep" / "table.json"
    edited = json.loads(shipped.read_text())
    edited["members"][0]["metrics"]["dev_pass_rate_delta"] = 1.0
    shipped.write_text(json.dumps(edited))
    refused = _openrelease(clone, "audit", str(bundle), "--clone", str(clone), "--public-key", str(clone / key))
    assert refused.returncode == 1 and "AUDIT FAILED" in refused.stdout
    assert "sweep/table.json does not match the sha256 in the manifest" in refused.stdout
