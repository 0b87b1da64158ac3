"""Publishing with the real huggingface_hub client to a Hub-compatible server on loopback, and auditing
a Hub repo id. HF_HUB_OFFLINE (set for the rest of the suite) is lifted here: it blocks uploads even
to localhost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.core.errors import GateError, SourceError
from pipeline.core.params import load_params
from pipeline.release import audit, hub
from pipeline.release.publish import dry_run
from tests.hub_server import HubServer
from tests.release_fixture import ROOT, VERSION, make_release_project

TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefgh"
MODEL, DATASET = "open-release/smollm2-135m-dpo", "open-release/smollm2-135m-dpo-pairs"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    return make_release_project(tmp_path_factory.mktemp("hub") / "proj", tiny_model_dir)


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # hf_xet is installed, so the client would upload through Xet storage, which this server does not
    # emulate; without it the client takes the Hub's LFS path (batch API, PUT, verify, lfsFile commit).
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def server(online):
    with HubServer(TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def bundle(project):
    return dry_run(load_params(project / "params.yaml"), project, project / "release")


def _info(bundle, srv):
    from dataclasses import replace

    return replace(bundle.info, endpoint=srv.url)


def _release_commits(srv, repo_id, repo_type):
    return [c for c in srv.repo(repo_id, repo_type).commits.values() if c.message != "initial commit"]


def test_publish_is_one_commit_per_repo_tagged_with_the_version(bundle, server):
    done = hub.publish_bundle(bundle.path, _info(bundle, server), False, TOKEN)
    assert [(d.repo_type, d.action) for d in done] == [("dataset", "committed"), ("model", "committed")]
    for repo_id, repo_type, folder in ((DATASET, "dataset", "dataset"), (MODEL, "model", "model")):
        assert len(_release_commits(server, repo_id, repo_type)) == 1
        repo = server.repo(repo_id, repo_type)
        assert repo.tags == {VERSION: repo.branches["main"]}
        files = server.files_at(repo_id, VERSION, repo_type)
        local = {p.relative_to(bundle.path / folder).as_posix(): p.read_bytes()
                 for p in (bundle.path / folder).rglob("*") if p.is_file()}
        assert {k: v for k, v in files.items() if k != ".gitattributes"} == local
    # The weights and Parquet splits travelled the Hub's LFS path; the card went inline.
    assert {"model.safetensors", "adapter/adapter_model.safetensors"} <= server.repo(MODEL, "model").resolve(VERSION).lfs
    assert "README.md" not in server.repo(MODEL, "model").resolve(VERSION).lfs
    assert {"data/train.parquet", "data/test.parquet"} <= server.repo(DATASET, "dataset").resolve(VERSION).lfs
    paths = [(m, p.split("?")[0]) for m, p, _ in server.state.requests]
    assert ("POST", f"/{MODEL}.git/info/lfs/objects/batch") in paths
    assert ("POST", f"/datasets/{DATASET}.git/info/lfs/objects/batch") in paths
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in paths)
    assert ("POST", "/lfs-verify") in paths and not any("xet" in p for _, p in paths)
    assert all(auth == "Bearer" for m, p, auth in server.state.requests if m == "POST" and "validate-yaml" not in p)
    first_commit = next(i for i, (m, p) in enumerate(paths) if "/commit/" in p)
    assert [p for _, p in paths[:2]] == ["/api/validate-yaml"] * 2   # both cards, before anything else
    assert "/api/repos/create" not in [p for _, p in paths[:2]] and first_commit > 2
    assert [t for t, _ in server.state.validations][:2] == ["model", "dataset"]
    assert all(errors == [] for _, errors in server.state.validations)


def test_rerun_changes_nothing(bundle, server):
    info = _info(bundle, server)
    hub.publish_bundle(bundle.path, info, False, TOKEN)
    again = hub.publish_bundle(bundle.path, info, False, TOKEN)
    assert [d.action for d in again] == ["already-released", "already-released"]
    assert len(_release_commits(server, MODEL, "model")) == 1


def test_failure_midway_leaves_the_model_repo_untouched_and_a_rerun_completes(bundle, server):
    info = _info(bundle, server)
    server.state.fail_commits[MODEL] = 1
    with pytest.raises(SourceError, match=r"model repo open-release/smollm2-135m-dpo at http://127.0.0.1:\d+: .*500.*"
                                             r"\(Internal Error \(injected by the test\)\)"):
        hub.publish_bundle(bundle.path, info, False, TOKEN)
    model = server.repo(MODEL, "model")
    assert model.tags == {} and _release_commits(server, MODEL, "model") == []   # as it was
    assert VERSION in server.repo(DATASET, "dataset").tags                        # that commit was whole
    done = hub.publish_bundle(bundle.path, info, False, TOKEN)
    assert [d.action for d in done] == ["already-released", "committed"]
    assert len(_release_commits(server, DATASET, "dataset")) == 1 and VERSION in model.tags


def test_committed_but_never_tagged_is_tagged_without_a_new_commit(bundle, server):
    info = _info(bundle, server)
    hub.publish_bundle(bundle.path, info, False, TOKEN)
    server.repo(MODEL, "model").tags.clear()  # as if the process died between commit and tag
    done = hub.publish_bundle(bundle.path, info, False, TOKEN)
    assert done[1].action == "tagged-existing" and len(_release_commits(server, MODEL, "model")) == 1
    assert server.repo(MODEL, "model").tags[VERSION] == done[1].commit


def test_an_existing_version_tag_is_never_overwritten(bundle, server, tmp_path):
    info = _info(bundle, server)
    hub.publish_bundle(bundle.path, info, False, TOKEN)
    tagged = dict(server.repo(DATASET, "dataset").tags)
    changed = tmp_path / "b"
    shutil.copytree(bundle.path, changed)
    (changed / "dataset" / "README.md").write_text("# something else\n")
    with pytest.raises(GateError, match=r"tag v0.1.0 already exists at [0-9a-f]{12} with different content "
                                        r"\(differs: README.md; 1 difference\(s\)\); a released version is never overwritten"):
        hub.publish_bundle(changed, info, False, TOKEN)
    assert server.repo(DATASET, "dataset").tags == tagged
    assert len(_release_commits(server, DATASET, "dataset")) == 1
    assert _release_commits(server, MODEL, "model") and server.repo(MODEL, "model").tags  # untouched too


def test_token_only_from_the_environment_and_checked(bundle, server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(GateError, match="HF_TOKEN is not set"):
        hub.token_from_env()
    with pytest.raises(SourceError, match=r"401") as e:
        hub.publish_bundle(bundle.path, _info(bundle, server), False, "hf_" + "wrong" * 7)
    assert "wrongwrong" not in str(e.value)
    assert server.repo(MODEL, "model") is None


def test_offline_mode_is_a_clear_error(bundle, server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set, which blocks every Hub request"):
        hub.publish_bundle(bundle.path, _info(bundle, server), False, TOKEN)


def test_audit_a_hub_repo_id_and_catch_a_swapped_dataset(bundle, server, project):
    hub.publish_bundle(bundle.path, _info(bundle, server), False, TOKEN)
    report = audit.audit(MODEL, revision=VERSION, endpoint=server.url, repo_root=project)
    assert report.problems == [], report.problems
    assert f"{DATASET}@{VERSION} (the dataset the manifest names)" in report.checked[0]
    commit = server.repo(DATASET, "dataset").resolve(VERSION)
    commit.files["data/train.parquet"] = commit.files["data/test.parquet"]  # tamper on the "Hub"
    problems = audit.audit(MODEL, revision=VERSION, endpoint=server.url).problems
    assert any(p.startswith("dataset/data/train.parquet: s") for p in problems)
    assert "dataset/data/train.parquet: not the split the train stage read" in problems


def _run(args, cwd, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_stages_and_cli_publish_never_leak_the_token(project, server, monkeypatch, capfd):
    """With a planted token: the card and publish stages, then a real `openrelease publish`; the token must
    appear in no output, log, lineage record, bundle, Hub file or mlflow.db."""
    from pipeline.core.stage import run_stage
    from pipeline.stages import card, publish

    monkeypatch.setenv("OPENRELEASE_LOG_LEVEL", "DEBUG")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for mod in (card, publish):
        ctx = run_stage(mod.STAGE, mod.READS, mod._body, params_file=project / "params.yaml", root=project)
        assert ctx.run.run_id and (project / ".openrelease" / "runs" / f"{mod.STAGE}.json").is_file()
    rec = json.loads((project / "lineage" / "publish.json").read_text())
    assert rec["extra"]["gates"]["dvc-status"] == "warn" and rec["extra"]["gates"]["licenses"] == "pass"
    assert (project / "outputs" / "cards" / "model" / "README.md").read_text() == \
        (project / "release" / "model" / "README.md").read_text()   # what was reviewed is what is published
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_DISABLE_XET="1")
    r = _run(["-m", "pipeline.cli", "publish", "--endpoint", server.url], project, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS dvc-status" in r.stdout and "PASS git-clean" in r.stdout
    assert f"model {MODEL}@{VERSION}: committed" in r.stdout
    captured = capfd.readouterr()
    for text in (r.stdout, r.stderr, captured.out, captured.err):
        assert TOKEN not in text
    needle, scanned = TOKEN.encode(), 0
    for p in project.rglob("*"):
        if p.is_file() and ".git" not in p.relative_to(project).parts:
            assert needle not in p.read_bytes(), p
            scanned += 1
    assert (project / "mlflow.db").is_file() and scanned > 30
    for repo in server.state.repos.values():
        for c in repo.commits.values():
            assert not any(needle in data for data in c.files.values())
    runs = json.loads(_run(["-c", "import json,sqlite3; c=sqlite3.connect('mlflow.db'); print(json.dumps("
                            "[r[0] for r in c.execute('select name from runs')]))"], project, env).stdout)
    assert {"card", "publish", "publish-hub"} <= set(runs)


@pytest.mark.slow
def test_dvc_style_stage_processes_and_audit_cli(project, server, tmp_path):
    """The stages as `dvc repro` runs them (separate processes), then `openrelease audit release`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")}
    env.update(HF_TOKEN=TOKEN, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_DISABLE_XET="1")
    for args in (["-m", "pipeline.stages.card"], ["-m", "pipeline.stages.publish"],
                 ["-m", "pipeline.cli", "audit", "release", "--public-key", ".openrelease/keys/signing-key.pub"]):
        r = _run(args, project, env)
        assert r.returncode == 0, f"{args}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
        assert TOKEN not in r.stdout + r.stderr
    assert "AUDIT PASSED" in r.stdout


def test_unreachable_tracking_server_stops_the_release_before_any_upload(project, server, monkeypatch):
    from pipeline.core.errors import TrackingError
    from pipeline.release.publish import publish

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    params = load_params(project / "params.yaml")
    with pytest.raises(TrackingError, match="cannot be reached"):
        publish(params, project, endpoint=server.url)
    assert server.state.repos == {}
