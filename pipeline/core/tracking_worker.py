"""One long-lived MLflow process per tracking URI, shared by every stage of a `dvc repro`.

Why: opening MLflow costs a stage process about 6 s before it can do any work: `import mlflow` 3.3-4.0 s
(it imports pandas, scipy, fastapi and the GenAI judges) and the SQLAlchemy store's schema check 2.1 s,
measured on the 2-core development machine (2026-12-06, /tmp/prof_ml.py; see BENCHMARKS.md). Thirteen
stages paid it once each. Now the first stage that needs MLflow starts this worker; it imports MLflow
once and holds the store open, and every stage process talks to it over a Unix socket with
`multiprocessing.connection` (authenticated with a random key in a file only this user can read). A
stage's tracking calls run the same code as before (pipeline.core.tracking), in the worker, in order;
each call returns only once MLflow has it, so errors reach the stage as `TrackingError` just as before.

- The worker is keyed by the tracking URI, this Python, the MLFLOW_* environment and the source of the
  tracking code, so a changed tracking module or URI gets a fresh worker, never a stale one.
- It exits after `idle_s` seconds with no stage connected.
- An unreachable tracking server still fails the stage in seconds: `check_reachable` runs in the stage
  before the worker is asked for anything, and the worker checks the store before it listens.
- OPENRELEASE_TRACKING_WORKER=0 runs MLflow in the stage process instead (for debugging).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core import tracking
from pipeline.core.errors import TrackingError

log = logging.getLogger(__name__)

ENV_USE_WORKER = "OPENRELEASE_TRACKING_WORKER"
ENV_AUTHKEY = "OPENRELEASE_TRACKING_WORKER_KEY"
# How long a worker may take to import MLflow and open the store: about 6 s on an idle 2-core machine,
# several times that while training saturates both cores.
START_TIMEOUT_S = 120.0
IDLE_S = 120.0
# The calls a stage may make on its run, forwarded to pipeline.core.tracking.StageRun.
RUN_METHODS = frozenset({"log_params", "log_metrics", "set_tags", "log_artifact", "log_input",
                         "register_logged_model", "log_model_metrics"})


def worker_address(uri: str) -> Path:
    """The socket of the worker for `uri` under this Python, environment and tracking code."""
    h = hashlib.sha256()
    for part in (uri, sys.executable, *sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MLFLOW_"))):
        h.update(part.encode() + b"\0")
    for module in (tracking.__file__, __file__):
        h.update(Path(module).read_bytes())
    return Path(tempfile.gettempdir()) / f"openrelease-mlflow-{os.getuid()}-{h.hexdigest()[:20]}.sock"


class RemoteStageRun:
    """A stage's MLflow run held by the worker: the same methods as tracking.StageRun."""

    def __init__(self, conn: Any, uri: str, info: dict[str, str]):
        self._conn, self.uri = conn, uri
        self.run_id, self.parent_run_id, self.experiment_id = info["run_id"], info["parent_run_id"], info["experiment_id"]

    def _call(self, method: str, **kwargs: Any) -> Any:
        return _call(self._conn, self.uri, method, **kwargs)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics=metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_input(self, path: str | Path, sha256: str, name: str | None = None, context: str = "input",
                  rows: int | None = None) -> None:
        self._call("log_input", path=str(Path(path).resolve()), sha256=sha256, name=name, context=context, rows=rows)

    def register_logged_model(self, name: str, params: dict[str, Any], tags: dict[str, str],
                              inputs: list[tuple[str | Path, str]]) -> str:
        return self._call("register_logged_model", name=name, params=params, tags=tags,
                          inputs=[(str(Path(p).resolve()), sha) for p, sha in inputs])

    def log_model_metrics(self, model_id: str, metrics: dict[str, float],
                          dataset: tuple[str | Path, str] | None = None) -> bool:
        ds = (str(Path(dataset[0]).resolve()), dataset[1]) if dataset else None
        return self._call("log_model_metrics", model_id=model_id, metrics=metrics, dataset=ds)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params_digest: str, git: dict[str, Any],
              root: str | Path = ".", timeout_s: float = 5.0) -> Iterator[Any]:
    """Like tracking.stage_run, through the worker for this tracking URI (started on first use)."""
    if os.environ.get(ENV_USE_WORKER, "1") == "0":
        with tracking.stage_run(stage, experiment, params_digest, git, root=root, timeout_s=timeout_s) as run:
            yield run
        return
    uri = tracking.default_tracking_uri(root)
    tracking._quiet_mlflow_env(timeout_s)
    t0 = time.monotonic()
    tracking.check_reachable(uri, timeout_s)
    request = tracking.stage_run_request(stage, experiment, params_digest, git)
    conn = _connect(uri, tracking.project_root(root))
    with conn:
        run = RemoteStageRun(conn, uri, _open(conn, uri, request))
        log.info("tracking at %s through its worker (ready in %.1fs)", uri, time.monotonic() - t0)
        try:
            yield run
        except BaseException:
            with contextlib.suppress(TrackingError):
                run._call("close", status="FAILED")
            raise
        run._call("close", status="FINISHED")


def _open(conn: Any, uri: str, request: dict[str, Any]) -> dict[str, str]:
    return _call(conn, uri, "open", request=request)


def _call(conn: Any, uri: str, method: str, **kwargs: Any) -> Any:
    """One call to the worker; it answers once MLflow has done it."""
    try:
        conn.send((method, kwargs))
        status, value = conn.recv()
    except (EOFError, OSError) as e:
        raise TrackingError(f"MLflow tracking worker for {uri} stopped answering ({e or type(e).__name__}); "
                            f"its log: {worker_address(uri)}.log") from None
    if status != "ok":
        raise TrackingError(value)
    return value


def _connect(uri: str, cwd: Path) -> Any:
    """A connection to the running worker for `uri`, starting one if there is none."""
    import fcntl
    from multiprocessing.connection import Client

    address = worker_address(uri)
    key_file = address.with_suffix(".key")
    with open(address.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one stage starts the worker; the others wait and connect
        if address.exists() and key_file.exists():
            with contextlib.suppress(OSError, EOFError):
                return Client(str(address), family="AF_UNIX", authkey=key_file.read_bytes())
            address.unlink(missing_ok=True)  # a worker that died without cleaning up
        authkey = secrets.token_bytes(32)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(authkey)
        proc = _spawn(uri, address, cwd, authkey)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TrackingError(f"MLflow tracking worker for {uri} exited: {_last_line(address)}")
            if address.exists():
                with contextlib.suppress(OSError, EOFError):
                    return Client(str(address), family="AF_UNIX", authkey=authkey)
            time.sleep(0.05)
        proc.kill()
        raise TrackingError(f"MLflow tracking worker for {uri} did not start within {START_TIMEOUT_S:.0f}s; "
                            f"its log: {address}.log")


def _spawn(uri: str, address: Path, cwd: Path, authkey: bytes) -> subprocess.Popen:
    env = {**os.environ, ENV_AUTHKEY: authkey.hex()}
    with open(f"{address}.log", "ab") as logf:
        # Its own session: it outlives this stage, and a Ctrl-C in the terminal does not reach it.
        return subprocess.Popen([sys.executable, "-m", "pipeline.core.tracking_worker", uri, str(address)],
                                cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)


def _last_line(address: Path) -> str:
    try:
        lines = Path(f"{address}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no message"


# --- the worker process ---------------------------------------------------------------------------

class _Worker:
    def __init__(self, uri: str, idle_s: float):
        self.uri, self.idle_s = uri, idle_s
        self.lock = threading.Lock()  # one MLflow call at a time: SQLite has one writer anyway
        self.connected = 0
        self.last_seen = time.monotonic()

    def serve(self, conn: Any) -> None:
        run = None
        with self.lock:
            self.connected += 1
        try:
            while True:
                try:
                    method, kwargs = conn.recv()
                except (EOFError, OSError):
                    break
                try:
                    with self.lock:
                        if method == "open":
                            run = tracking.open_stage_run(self.uri, kwargs["request"])
                            value = {"run_id": run.run_id, "parent_run_id": run.parent_run_id,
                                     "experiment_id": run.experiment_id}
                        elif method == "close":
                            tracking.close_stage_run(run, kwargs["status"])
                            value, run = None, None
                        elif method in RUN_METHODS and run is not None:
                            value = getattr(run, method)(**kwargs)
                        else:
                            raise TrackingError(f"tracking worker: unknown call {method!r}")
                    conn.send(("ok", value))
                except Exception as e:  # noqa: BLE001 (every failure goes back to the stage as one line)
                    log.exception("call %s failed", method)
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    conn.send(("error", msg if isinstance(e, TrackingError) else f"MLflow ({self.uri}): {msg}"))
        finally:
            if run is not None:  # the stage process died mid-run
                with contextlib.suppress(Exception), self.lock:
                    tracking.close_stage_run(run, "FAILED")
            with self.lock:
                self.connected -= 1
                self.last_seen = time.monotonic()
            conn.close()

    def idle(self) -> bool:
        with self.lock:
            return self.connected == 0 and time.monotonic() - self.last_seen > self.idle_s


def main(argv: list[str] | None = None) -> None:
    from multiprocessing.connection import Listener

    uri, address = (argv or sys.argv[1:])[:2]
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    authkey = bytes.fromhex(os.environ.pop(ENV_AUTHKEY))
    try:
        tracking.check_reachable(uri)
        import mlflow  # noqa: F401 (imported once here, the reason this process exists)
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)  # opens (and if new, creates) the store
    except Exception as e:  # noqa: BLE001 (the stage that started us prints this line)
        print(f"cannot open MLflow tracking URI {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        sys.exit(1)
    worker = _Worker(uri, float(os.environ.get("OPENRELEASE_TRACKING_WORKER_IDLE_S", IDLE_S)))
    tmp = Path(f"{address}.{os.getpid()}")
    listener = Listener(str(tmp), family="AF_UNIX", authkey=authkey)
    os.chmod(tmp, 0o600)
    os.replace(tmp, address)  # the socket appears only once it accepts connections
    log.info("tracking worker for %s listening at %s", uri, address)

    def reap() -> None:
        while not worker.idle():
            time.sleep(1.0)
        with contextlib.suppress(OSError):
            if os.stat(address).st_ino == inode:  # not a newer worker's socket
                os.unlink(address)
        time.sleep(1.0)  # a stage that connected just before the unlink is still served
        while worker.connected:
            time.sleep(1.0)
        log.info("idle for %.0fs: exiting", worker.idle_s)
        os._exit(0)

    inode = os.stat(address).st_ino
    threading.Thread(target=reap, daemon=True).start()
    while True:
        try:
            conn = listener.accept()
        except Exception as e:  # noqa: BLE001 (a client with a wrong key, or one that hung up)
            log.warning("refused a connection: %s", e)
            continue
        threading.Thread(target=worker.serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
