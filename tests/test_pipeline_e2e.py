"""The whole pipeline, `dvc repro` end to end in a fresh git copy, on a tiny config.

Tiny random Llama model, a handful of on-policy prompts plus 40 real LLaMA-Factory pairs, one short
training epoch, a few evaluation prompts; it ends with a dry-run release that `openrelease audit`
must pass. About two minutes on 2 cores: in the default suite so CI runs the whole pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.core.lineage import sha256_file
from tests.conftest import shared_data
from tests.helpers import dvc, edit_params, env_for, make_project_copy

STAGES = ["base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate", "card", "publish"]


def test_dvc_repro_whole_pipeline_then_audit(tiny_model_dir, tmp_path):
    pairs = shared_data("llama-factory", "dpo_en_demo.json")
    project = make_project_copy(tmp_path / "proj")
    edit_params(
        project,
        base_model={"name": "tiny-llama", "source": "local", "local": str(tiny_model_dir), "license": "MIT",
                    "sha256": sha256_file(tiny_model_dir / "model.safetensors")},
        generate={"max_prompts": 6, "samples_per_prompt": 2, "max_new_tokens": 16, "batch_size": 12},
        data={"sources": [
            {"name": "on-policy", "format": "ultrafeedback", "path": "outputs/rated.jsonl", "license": "Apache-2.0"},
            {"name": "llama-factory-demo", "format": "sharegpt", "path": str(pairs), "license": "Apache-2.0",
             "max_rows": 40},
        ]},
        validate={"max_quarantine_fraction": 0.5, "max_length": 1024},  # = train.dpo.max_length
        train={"dpo": {"num_train_epochs": 1, "max_length": 1024, "precompute_ref_batch_size": 4},
               "per_device_batch_size": 2, "global_batch_size": 4, "checkpoint_every": 4},
        evaluate={"max_eval_prompts": 4, "pref_max_pairs": 8, "generation": {"max_new_tokens": 16, "batch_size": 8},
                  "general": {"max_prompts": 2}, "bootstrap": {"n_resamples": 199}},
        publish={"thresholds": {}},  # a random tiny model answers with nothing: no length ratio to gate on
    )
    git = ["git", "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run([*git, "commit", "-qam", "tiny config"], cwd=project, check=True)
    subprocess.run([*git, "tag", "v0.0.1"], cwd=project, check=True)

    result = dvc(project, "repro", timeout=1800)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])

    for stage in STAGES:
        record = json.loads((project / "lineage" / f"{stage}.json").read_text())
        assert record["mlflow"]["run_id"], stage
    parents = {json.loads((project / "lineage" / f"{s}.json").read_text())["mlflow"]["parent_run_id"] for s in STAGES}
    assert len(parents) == 1, "one parent MLflow run per pipeline execution"

    eval_metrics = json.loads((project / "metrics" / "eval.json").read_text())
    for key in ("pref_accuracy", "reward_margin", "pass_rate_base", "pass_rate_policy", "pass_rate_delta",
                "win_rate", "lc_win_rate", "length_ratio", "kl"):
        assert key in eval_metrics, key
    assert (project / "models" / "trained" / "model.safetensors").is_file()

    # The signer pinned to the key this machine generated (outside the bundle); unpinned would exit 3.
    audit = subprocess.run([str(Path(sys.executable).parent / "openrelease"), "audit", "release", "--public-key",
                            ".openrelease/keys/signing-key.pub"], cwd=project,
                           env=env_for(project), capture_output=True, text=True, timeout=600)
    assert audit.returncode == 0, (audit.stdout[-3000:], audit.stderr[-3000:])

    status = dvc(project, "status")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
