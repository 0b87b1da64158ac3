"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline execution (one `dvc repro`), one child run per stage. A stage process
finds its pipeline execution by walking up to the `dvc` process that started it, so every stage of one
`dvc repro` lands under the same parent even though each is its own process.

The default backend is `sqlite:///<repo>/mlflow.db` (absolute, so DVC's temporary experiment
workspaces log to the same database); MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.core.errors import TrackingError

log = logging.getLogger(__name__)

TAG_PIPELINE_KEY = "openrelease.pipeline_key"
TAG_STAGE = "openrelease.stage"
TAG_COMMIT = "openrelease.git_commit"
TAG_DIRTY = "openrelease.git_dirty"
TAG_PARAMS_DIGEST = "openrelease.params_digest"
ENV_PIPELINE_KEY = "OPENRELEASE_PIPELINE_KEY"
# `openrelease sweep` sets this: each member's pipeline run becomes a child of the sweep's parent run
ENV_SWEEP_RUN_ID = "OPENRELEASE_SWEEP_RUN_ID"
TAG_DVC_EXP = "openrelease.dvc_exp"


def project_root(root: str | Path = ".") -> Path:
    """The main repo root, also from inside a DVC temporary experiment workspace
    (`<repo>/.dvc/tmp/exps/<tmpdir>`), so experiments log next to ordinary runs."""
    root = Path(root).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def default_tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def _quiet_mlflow_env(timeout_s: float) -> None:
    # Fail fast on an unreachable server instead of MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError within about `timeout_s` seconds if the backend at `uri` is unusable."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(parsed.path if not parsed.netloc else parsed.netloc + parsed.path)
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist or is not writable")
        return
    if parsed.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked)
                if resp.status >= 400:
                    raise TrackingError(f"MLflow tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {uri} cannot be reached: {reason}") from None
        return
    if parsed.scheme in ("", "file"):
        folder = Path(parsed.path or uri)
        target = folder if folder.exists() else folder.parent
        if not os.access(target, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {uri}: {target} is not writable")
        return
    # Other schemes (databricks, ...) are checked by the first client call.


def pipeline_key() -> str:
    """Identify this pipeline execution: the `dvc` process that started us, else this process."""
    if key := os.environ.get(ENV_PIPELINE_KEY):
        return key
    import psutil

    proc = psutil.Process()
    try:
        for parent in proc.parents():
            cmd = parent.cmdline()
            names = {Path(c).name for c in cmd[:3]}
            if "dvc" in names or any(c.endswith("/dvc") for c in cmd[:3]):
                exp = os.environ.get("DVC_EXP_NAME")  # set by DVC for every experiment it runs
                return f"dvc-{parent.pid}-{int(parent.create_time())}" + (f"-{exp}" if exp else "")
    except (psutil.Error, OSError):
        pass
    return f"proc-{proc.pid}-{int(proc.create_time())}"


class StageRun:
    """A child MLflow run for one stage, under its pipeline execution's parent run.

    Every call names its run id instead of relying on MLflow's active-run stack, so one tracking worker
    (pipeline.core.tracking_worker) can hold the runs of several stage processes at once."""

    def __init__(self, run_id: str, parent_run_id: str, uri: str, experiment_id: str, stage: str):
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.stage = stage

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = _flatten(params)
        # MLflow caps a param value at 6000 chars; longer values are truncated, not dropped.
        items = {k: (str(v)[:6000] if v is not None else "None") for k, v in flat.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: items[k] for k in keys[i : i + 100]}, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path or p.name, run_id=self.run_id)
        else:
            mlflow.log_artifact(str(p), artifact_path=artifact_path, run_id=self.run_id)

    def log_input(self, path: str | Path, sha256: str, name: str | None = None, context: str = "input",
                  rows: int | None = None) -> None:
        """Log a dataset input with an explicit, audit-grade sha256 digest (not MLflow's row sample)."""
        tags = {"sha256": sha256}
        if rows is not None:
            tags["rows"] = str(rows)
        self._log_inputs(datasets=[_dataset_input(path, sha256, name, context, tags)])

    def _log_inputs(self, datasets=None, models=None) -> None:
        self.client.log_inputs(self.run_id, datasets=datasets, models=models)

    def register_logged_model(self, name: str, params: dict[str, Any], tags: dict[str, str],
                              inputs: list[tuple[str | Path, str]]) -> str:
        """Record an external model (weights live in the DVC cache, not in MLflow) as a LoggedModel
        linked to this run and its dataset inputs. Returns the model id."""
        import mlflow
        from mlflow.entities import LoggedModelInput

        model = mlflow.create_external_model(name=name, source_run_id=self.run_id, experiment_id=self.experiment_id,
                                             params={k: str(v) for k, v in _flatten(params).items()}, tags=tags)
        for path, sha in inputs:
            self._log_inputs(datasets=[_dataset_input(path, sha, Path(path).name, "training", {"sha256": sha})],
                             models=[LoggedModelInput(model.model_id)])
        return model.model_id

    def log_model_metrics(self, model_id: str, metrics: dict[str, float],
                          dataset: tuple[str | Path, str] | None = None) -> bool:
        """Attach metrics, from this run, to an existing LoggedModel (they show on the model's page),
        optionally tagged with the dataset (path, sha256) they were computed on. Returns False, with a
        warning, when the model id is not in this tracking store (e.g. trained against another URI)."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.exceptions import MlflowException

        try:
            mlflow.get_logged_model(model_id)
        except MlflowException as e:
            log.warning("LoggedModel %s not found in this tracking store (%s); metrics stay on the run only",
                        model_id, str(e).splitlines()[0])
            return False
        ds = None
        if dataset is not None:
            path, sha = dataset
            ds = MetaDataset(source=_local_source(path), name=Path(path).name, digest=sha[:36])
        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        mlflow.log_metrics(clean, model_id=model_id, dataset=ds, run_id=self.run_id)
        self.set_tags({"openrelease.evaluated_model_id": model_id})
        return True


def _dataset_input(path: str | Path, sha256: str, name: str | None, context: str, tags: dict[str, str]):
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = MetaDataset(source=_local_source(path), name=name or Path(path).name, digest=sha256[:36])
    return DatasetInput(dataset=ds._to_mlflow_entity(),
                        tags=[*(InputTag(k, v) for k, v in tags.items()), InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _local_source(path: str | Path):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers the local source twice and warns about it
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(Path(path).resolve()))


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def stage_run_request(stage: str, experiment: str, params_digest: str, git: dict[str, Any]) -> dict[str, Any]:
    """What `open_stage_run` needs to know about the stage process: computed in that process (its parent
    `dvc`, its environment), so a tracking worker can open the run on its behalf."""
    import getpass

    return {"stage": stage, "experiment": experiment, "params_digest": params_digest,
            "git": {"commit": str(git.get("commit")), "dirty": str(git.get("dirty"))},
            "pipeline_key": pipeline_key(), "sweep_tags": _sweep_tags(), "user": getpass.getuser(),
            "parent_name": os.environ.get("DVC_EXP_NAME") or f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"}


def open_stage_run(uri: str, request: dict[str, Any]) -> StageRun:
    """Create the stage's child run, and the pipeline's parent run on first use."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    stage, git, key = request["stage"], request["git"], request["pipeline_key"]
    try:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(request["experiment"])
        exp_id = exp.experiment_id if exp else client.create_experiment(request["experiment"])
        found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}'", max_results=1)
        if found:
            parent_id = found[0].info.run_id
        else:
            parent = client.create_run(exp_id, run_name=request["parent_name"],
                                       tags={TAG_PIPELINE_KEY: key, TAG_COMMIT: git["commit"], TAG_DIRTY: git["dirty"],
                                             "mlflow.user": request["user"], **request["sweep_tags"]})
            parent_id = parent.info.run_id
        # The tags `mlflow.start_run` would add from its own process, named for the stage process. No
        # repository URL: MLflow takes it from `git remote`, which for a clone of a folder is a local path.
        tags = {
            "mlflow.parentRunId": parent_id,
            "mlflow.user": request["user"],
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"python -m pipeline.stages.{stage}",
            "mlflow.source.git.commit": git["commit"],
            TAG_STAGE: stage,
            TAG_COMMIT: git["commit"],
            TAG_DIRTY: git["dirty"],
            TAG_PARAMS_DIGEST: request["params_digest"],
            TAG_PIPELINE_KEY: key + "/" + stage,
        }
        run = client.create_run(exp_id, run_name=stage, tags=tags)
    except MlflowException as e:
        raise TrackingError(f"MLflow tracking URI {uri}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise TrackingError(f"MLflow tracking URI {uri} cannot be reached: {e}") from None
    return StageRun(run.info.run_id, parent_id, uri, exp_id, stage)


def close_stage_run(run: StageRun, status: str) -> None:
    """End the stage's run. A finished one is summarized on its parent, which is "finished" as of its
    latest stage: the next stage simply extends it."""
    client = run.client
    client.set_terminated(run.run_id, status)
    if status == "FINISHED":
        _summarize_on_parent(client, run.parent_run_id, run.stage, run.run_id)
        client.set_terminated(run.parent_run_id, "FINISHED")


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params_digest: str, git: dict[str, Any],
              root: str | Path = ".", timeout_s: float = 5.0) -> Iterator[StageRun]:
    """Open the stage's child run in this process (creating the pipeline's parent run on first use).

    Fails with TrackingError before any work is done if the backend cannot be reached. Stages normally
    go through pipeline.core.tracking_worker, which runs this same code in a long-lived process."""
    uri = default_tracking_uri(root)
    _quiet_mlflow_env(timeout_s)
    t0 = time.monotonic()
    check_reachable(uri, timeout_s)
    run = open_stage_run(uri, stage_run_request(stage, experiment, params_digest, git))
    log.info("tracking at %s in this process (ready in %.1fs)", uri, time.monotonic() - t0)
    try:
        yield run
    except BaseException:
        close_stage_run(run, "FAILED")
        raise
    close_stage_run(run, "FINISHED")


def _summarize_on_parent(client, parent_id: str, stage: str, run_id: str) -> None:
    """Copy a finished stage run's metrics and params onto the pipeline's parent run as `STAGE/KEY`, and
    link the stage run by id, so the parent's row in the MLflow UI shows the headline numbers and the
    key settings of the whole execution. Best effort: the stage's own run already holds all of it."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    try:
        data = client.get_run(run_id).data
        now = int(time.time() * 1000)
        metrics = [Metric(f"{stage}/{k}", v, now, 0) for k, v in data.metrics.items()]
        have = client.get_run(parent_id).data.params
        params = [Param(f"{stage}/{k}", v) for k, v in data.params.items() if f"{stage}/{k}" not in have]
        client.log_batch(parent_id, metrics=metrics, params=params[:1000],
                         tags=[RunTag(f"openrelease.stage_run.{stage}", run_id)])
    except MlflowException as e:  # e.g. a stage re-run under one parent with a changed param value
        log.warning("MLflow: could not copy stage %s's results onto the parent run: %s", stage,
                    str(e).splitlines()[0])


def run_metrics_logger(run_id: str, root: str | Path = ".") -> Any:
    """A `log(metrics, step)` function that logs to an existing run by id, for a process that did not
    open it (an `accelerate launch` worker of the train stage)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(root))

    def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if _is_number(v)]
        if batch:
            client.log_batch(run_id, metrics=batch)

    return log_metrics


def find_runs(experiment: str, filter_string: str = "", root: str | Path = ".") -> list[Any]:
    """Runs of an experiment (for tests, cards and audit)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


def _sweep_tags() -> dict[str, str]:
    tags = {}
    if sweep := os.environ.get(ENV_SWEEP_RUN_ID):
        tags["mlflow.parentRunId"] = sweep
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags[TAG_DVC_EXP] = exp
    return tags


def start_sweep_run(experiment: str, name: str, tags: dict[str, str], params: dict[str, Any],
                    root: str | Path = ".", timeout_s: float = 5.0) -> str:
    """Create the sweep's parent run (left RUNNING until `end_sweep_run`); returns its id."""
    uri = default_tracking_uri(root)
    _quiet_mlflow_env(timeout_s)
    check_reachable(uri, timeout_s)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
    flat = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    return run.info.run_id


def member_runs(experiment: str, sweep_run_id: str, names: list[str], root: str | Path = ".") -> dict[str, str]:
    """DVC experiment name -> the id of its pipeline run. A member whose run is not yet a child of the
    sweep run (its worker started without the environment variable) is adopted now."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(root))
    out: dict[str, str] = {}
    for run in find_runs(experiment, "", root):
        exp_name = run.data.tags.get(TAG_DVC_EXP)
        if exp_name in names and TAG_STAGE not in run.data.tags:
            if exp_name not in out or run.info.start_time > client.get_run(out[exp_name]).info.start_time:
                out[exp_name] = run.info.run_id
    for run_id in out.values():
        if client.get_run(run_id).data.tags.get("mlflow.parentRunId") != sweep_run_id:
            client.set_tag(run_id, "mlflow.parentRunId", sweep_run_id)
    return out


def stage_run_metrics(experiment: str, pipeline_runs: dict[str, str], stage: str,
                      root: str | Path = ".") -> dict[str, dict[str, float]]:
    """Name -> the metrics of the `stage` child run of each pipeline run in `pipeline_runs` (name -> run
    id). Run facts such as a cache hit are logged there, not in the stage's DVC metrics file."""
    by_parent = {run_id: name for name, run_id in pipeline_runs.items()}
    out: dict[str, dict[str, float]] = {}
    for run in find_runs(experiment, f"tags.`{TAG_STAGE}` = '{stage}'", root):
        name = by_parent.get(run.data.tags.get("mlflow.parentRunId"))
        if name is not None and name not in out:  # search_runs returns the newest first
            out[name] = dict(run.data.metrics)
    return out


def end_sweep_run(run_id: str, metrics: dict[str, float], artifacts: list[Path], status: str,
                  root: str | Path = ".") -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(root))
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
    if batch:
        client.log_batch(run_id, metrics=batch)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="sweep")
    client.set_terminated(run_id, status)
