"""Test helpers: a temporary copy of the project as its own git repo, for `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of this checkout (what a fresh clone would hold,
    plus work in progress)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def make_project_copy(dest: Path) -> Path:
    """Copy the project into `dest`, make it a git repo with one commit, and return it."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test copy"], cwd=dest, check=True)
    return dest


def edit_params(project: Path, **sections) -> None:
    """Merge `sections` (nested dicts) into the copy's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and v and isinstance(dst.get(k), dict):  # an empty dict replaces
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(params, sections)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(project),
    })
    env.update(extra)
    return env


def dvc(project: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project,
                          env=env or env_for(project), capture_output=True, text=True, timeout=timeout)


GIT = ["git", "-c", "user.email=t@e", "-c", "user.name=t", "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false"]


def git(project: Path, *args: str) -> str:
    out = subprocess.run([*GIT, *args], cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


def configure_tiny(project: Path, tiny_model_dir: Path, pairs: Path) -> None:
    """The tiny config of the pipeline tests: tiny random Llama, 6 on-policy prompts + 40 real pairs,
    one short epoch, a few evaluation prompts (about two minutes of `dvc repro` on 2 cores)."""
    from pipeline.core.lineage import sha256_file

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
        # a random tiny model answers with nothing: no length ratio to gate on, no trivial answer to beat
        publish={"thresholds": {}, "beat_trivial_floor": False},
    )
