"""MLflow tracking: parent/child runs, tags, audit-grade input digests, fast failure."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import tracking
from pipeline.core.errors import TrackingError

GIT = {"commit": "a" * 40, "dirty": False}


@pytest.fixture()
def sqlite_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_stage_runs_of_one_pipeline_share_a_parent(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "exec-1")
    with tracking.stage_run("first", "exp", "d1", GIT, root=tmp_path) as a:
        a.log_params({"train": {"beta": 0.1}})
        a.log_metrics({"loss": 0.5, "bad": "n/a"})
    with tracking.stage_run("second", "exp", "d2", GIT, root=tmp_path) as b:
        pass
    assert a.parent_run_id == b.parent_run_id
    client = MlflowClient(sqlite_uri)
    run = client.get_run(a.run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == a.parent_run_id
    assert tags[tracking.TAG_STAGE] == "first"
    assert tags[tracking.TAG_COMMIT] == "a" * 40
    assert tags[tracking.TAG_DIRTY] == "False"
    assert tags[tracking.TAG_PARAMS_DIGEST] == "d1"
    assert run.data.params == {"train.beta": "0.1"}
    assert run.data.metrics == {"loss": 0.5}
    assert client.get_run(a.parent_run_id).info.status == "FINISHED"


def test_new_pipeline_execution_gets_new_parent(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "exec-1")
    with tracking.stage_run("s", "exp", "d", GIT, root=tmp_path) as a:
        pass
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "exec-2")
    with tracking.stage_run("s", "exp", "d", GIT, root=tmp_path) as b:
        pass
    assert a.parent_run_id != b.parent_run_id


def test_log_input_keeps_explicit_sha256(sqlite_uri, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"a": 1}\n')
    sha = "f" * 64
    with tracking.stage_run("s", "exp", "d", GIT, root=tmp_path) as run:
        run.log_input(data, sha, name="pairs", rows=1)
    inputs = MlflowClient(sqlite_uri).get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "pairs"
    assert inputs[0].dataset.digest == sha[:36]
    assert {t.key: t.value for t in inputs[0].tags}["sha256"] == sha


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"{uri} cannot be reached"):
        with tracking.stage_run("s", "exp", "d", GIT, root=tmp_path, timeout_s=2):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - t0 < 10


def test_default_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_pipeline_key_from_env(monkeypatch):
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "k")
    assert tracking.pipeline_key() == "k"
    monkeypatch.delenv(tracking.ENV_PIPELINE_KEY)
    assert tracking.pipeline_key().startswith(("dvc-", "proc-"))


def test_dvc_temp_experiment_workspace_logs_to_main_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert tracking.default_tracking_uri(workspace) == f"sqlite:///{tmp_path.resolve()}/repo/mlflow.db"


def test_parent_run_carries_each_stages_metrics_params_and_a_link(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "exec-summary")
    with tracking.stage_run("train", "exp", "d1", GIT, root=tmp_path) as t:
        t.log_params({"train": {"beta": 0.1}})
        t.log_metrics({"train_loss": 0.5})
    with tracking.stage_run("evaluate", "exp", "d2", GIT, root=tmp_path) as e:
        e.log_metrics({"pass_rate_policy": 0.36})
    parent = MlflowClient(sqlite_uri).get_run(t.parent_run_id).data
    assert parent.metrics == {"train/train_loss": 0.5, "evaluate/pass_rate_policy": 0.36}
    assert parent.params == {"train/train.beta": "0.1"}
    assert parent.tags["openrelease.stage_run.train"] == t.run_id
    assert parent.tags["openrelease.stage_run.evaluate"] == e.run_id


def test_a_local_path_is_never_logged_as_the_repository_url(sqlite_uri, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", "/home/someone/work/open-release"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@e.com", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.chdir(repo)
    from mlflow.utils.git_utils import get_git_repo_url

    assert get_git_repo_url(str(repo)) == "/home/someone/work/open-release"  # what MLflow would log
    with tracking.stage_run("s", "exp", "d", GIT, root=tmp_path) as run:
        pass
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    assert all(not tags.get(k, "").startswith("/") for k in ("mlflow.source.git.repoURL", "mlflow.gitRepoURL"))
