"""The tracking worker: stages reach MLflow through one long-lived process per URI, with the same runs,
the same failures and no stale code."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import tracking, tracking_worker
from pipeline.core.errors import TrackingError

GIT = {"commit": "b" * 40, "dirty": False}


@pytest.fixture()
def sqlite_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking_worker.ENV_USE_WORKER, "1")
    monkeypatch.setenv("OPENRELEASE_TRACKING_WORKER_IDLE_S", "5")
    return uri


def _listening_lines(uri: str) -> int:
    log = Path(f"{tracking_worker.worker_address(uri)}.log")
    return log.read_text().count("listening at") if log.exists() else 0


def test_stages_share_one_worker_and_get_the_same_runs_as_in_process(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_PIPELINE_KEY, "exec-w")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"a": 1}\n')
    with tracking_worker.stage_run("first", "exp", "d1", GIT, root=tmp_path) as a:
        assert isinstance(a, tracking_worker.RemoteStageRun)
        a.log_params({"train": {"beta": 0.1}})
        a.log_metrics({"loss": 0.5, "bad": "n/a"})
        a.log_input(data, "f" * 64, name="pairs", rows=1)
        a.log_artifact(data, artifact_path="lineage")
        model_id = a.register_logged_model("m", params={"lr": 1}, tags={"k": "v"}, inputs=[(data, "e" * 64)])
    with tracking_worker.stage_run("second", "exp", "d2", GIT, root=tmp_path) as b:
        assert b.log_model_metrics(model_id, {"acc": 0.75}, dataset=(data, "f" * 64))
        assert not b.log_model_metrics("m-doesnotexist", {"acc": 0.75})
    assert _listening_lines(sqlite_uri) == 1  # the second stage reused the first one's worker
    client = MlflowClient(sqlite_uri)
    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.beta": "0.1"}
    assert run.data.metrics == {"loss": 0.5}
    assert run.data.tags["mlflow.parentRunId"] == a.parent_run_id == b.parent_run_id
    assert run.data.tags[tracking.TAG_STAGE] == "first"
    assert run.data.tags["mlflow.source.name"] == "python -m pipeline.stages.first"
    assert not any("repoURL" in k for k in run.data.tags)
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["pairs"] == "f" * 36
    assert [f.path for f in client.list_artifacts(a.run_id, "lineage")] == ["lineage/pairs.jsonl"]
    assert client.get_logged_model(model_id).source_run_id == a.run_id
    parent = client.get_run(a.parent_run_id)
    assert parent.data.metrics["first/loss"] == 0.5
    assert parent.data.tags["openrelease.stage_run.second"] == b.run_id
    assert client.get_run(b.run_id).data.tags["openrelease.evaluated_model_id"] == model_id


def test_a_failing_stage_marks_its_run_failed(sqlite_uri, tmp_path):
    with pytest.raises(RuntimeError), tracking_worker.stage_run("s", "exp", "d", GIT, root=tmp_path) as run:
        raise RuntimeError("stage failed")
    assert MlflowClient(sqlite_uri).get_run(run.run_id).info.status == "FAILED"


def test_a_stage_process_that_dies_leaves_a_failed_run(sqlite_uri, tmp_path):
    request = tracking.stage_run_request("s", "exp", "d", GIT)
    conn = tracking_worker._connect(sqlite_uri, tmp_path)
    info = tracking_worker._open(conn, sqlite_uri, request)
    conn.close()  # as if the stage were killed: no "close" call
    client = MlflowClient(sqlite_uri)
    for _ in range(100):
        if client.get_run(info["run_id"]).info.status == "FAILED":
            break
        time.sleep(0.1)
    assert client.get_run(info["run_id"]).info.status == "FAILED"


def test_an_error_in_mlflow_reaches_the_stage_as_one_line(sqlite_uri, tmp_path):
    with tracking_worker.stage_run("s", "exp", "d", GIT, root=tmp_path) as run:
        run.log_params({"k": 1})
        with pytest.raises(TrackingError, match=r"^MLflow \(sqlite:.*\): .*") as e:
            run.log_params({"k": 2})  # MLflow refuses to change a logged param
        assert "\n" not in str(e.value)


def test_unreachable_server_fails_fast_without_starting_a_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv(tracking_worker.ENV_USE_WORKER, "1")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="cannot be reached"), \
            tracking_worker.stage_run("s", "exp", "d", GIT, root=tmp_path, timeout_s=2):
        pass
    assert time.monotonic() - t0 < 5
    assert _listening_lines("http://127.0.0.1:9") == 0


def test_a_store_the_worker_cannot_open_is_one_line_naming_the_uri(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_text("this is not a database\n" * 100)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking_worker.ENV_USE_WORKER, "1")
    with pytest.raises(TrackingError, match=rf"exited: cannot open MLflow tracking URI {uri}: "), \
            tracking_worker.stage_run("s", "exp", "d", GIT, root=tmp_path):
        pass


def test_worker_is_keyed_by_uri_and_tracking_code(tmp_path, monkeypatch):
    a = tracking_worker.worker_address("sqlite:////x/mlflow.db")
    assert a == tracking_worker.worker_address("sqlite:////x/mlflow.db")
    assert a != tracking_worker.worker_address("sqlite:////y/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t")
    assert a != tracking_worker.worker_address("sqlite:////x/mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    changed = tmp_path / "tracking.py"
    changed.write_text(Path(tracking.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(tracking, "__file__", str(changed))
    assert a != tracking_worker.worker_address("sqlite:////x/mlflow.db")


def test_worker_off_runs_mlflow_in_the_stage_process(sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking_worker.ENV_USE_WORKER, "0")
    with tracking_worker.stage_run("s", "exp", "d", GIT, root=tmp_path) as run:
        assert isinstance(run, tracking.StageRun)
