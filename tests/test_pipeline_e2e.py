"""The whole pipeline and the release workflow's steps, on a tiny config, in temporary git repos.

1. `dvc repro` of all 10 stages in a fresh git copy (tiny random Llama, a handful of on-policy prompts
   plus 40 real LLaMA-Factory pairs, one short epoch); the dry-run release audits clean.
2. A failed stage (tracking server unreachable) loses its outputs; `dvc checkout` brings them back.
3. `.github/workflows/release.yml`, step by step: `dvc push` to a local remote, commit, tag; a fresh
   `git clone` of the tag (same venv, no reinstall), `dvc pull`; `openrelease publish` with every gate
   enforced to the loopback Hub server, without rerunning a stage; `openrelease audit <repo>
   --revision <tag> --public-key <pinned>` passes. Then `dvc artifacts get` finds the released model.
In the default suite so CI runs the whole pipeline and the release path: 239 s wall (157 s user CPU)
measured on 2 cores shared with other jobs (load average 6-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.lineage import sha256_file
from tests.conftest import shared_data
from tests.helpers import configure_tiny, dvc, env_for, git, make_project_copy

STAGES = ["base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate", "card", "publish"]
TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefgh"
MODEL_REPO = "open-release/smollm2-135m-dpo"   # publish.model_repo in params.yaml
BIN = Path(sys.executable).parent


def _openrelease(project: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run([str(BIN / "openrelease"), *args], cwd=project, env=env or env_for(project),
                          capture_output=True, text=True, timeout=900)


def _signing_key(folder: Path) -> tuple[Path, Path]:
    """The CI secret (a private key file, 0600) and the public key users pin."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "signing-key.pem", folder / "pinned-key.pub"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _outputs(project: Path, rels: list[str]) -> dict[str, str]:
    return {r: sha256_file(project / r) for r in rels}


def test_dvc_repro_whole_pipeline_then_the_release_workflow(tiny_model_dir, tmp_path):
    project = make_project_copy(tmp_path / "proj")
    configure_tiny(project, tiny_model_dir, shared_data("llama-factory", "dpo_en_demo.json"))
    git(project, "commit", "-qam", "tiny config")

    # 1. the pipeline ------------------------------------------------------------------------------
    result = dvc(project, "repro", timeout=2400)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    runs = {s: json.loads((project / ".openrelease" / "runs" / f"{s}.json").read_text()) for s in STAGES}
    for stage in STAGES:
        record = json.loads((project / "lineage" / f"{stage}.json").read_text())
        assert "mlflow" not in record and "finished_at" not in record, stage  # run facts stay out of DVC outputs
        assert runs[stage]["mlflow"]["run_id"] and runs[stage]["lineage_sha256"] == sha256_file(
            project / "lineage" / f"{stage}.json")
        assert runs[stage]["git"]["dirty"] is False, stage  # only dvc.lock and outputs changed during the run
    assert len({r["mlflow"]["parent_run_id"] for r in runs.values()}) == 1, "one parent MLflow run per execution"
    # why earlier checkpoints were discarded depends on the workspace's past: a run fact, never lineage
    train_lineage = json.loads((project / "lineage" / "train.json").read_text())["extra"]["train"]
    assert "restart_reason" not in train_lineage["resume"] and "restart_reason" in runs["train"]["train"]
    assert runs["train"]["cpu_runtime"]["allocator"] in ("tcmalloc", "system")  # pipeline/core/runtime.py
    eval_metrics = json.loads((project / "metrics" / "eval.json").read_text())
    for key in ("pref_accuracy", "reward_margin", "pass_rate_base", "pass_rate_policy", "pass_rate_delta",
                "win_rate", "lc_win_rate", "length_ratio", "kl"):
        assert key in eval_metrics, key
    assert not {"wall_time_s", "cpu_s", "peak_rss_mb", "tokens_per_s"} & set(
        json.loads((project / "metrics" / "train.json").read_text()))
    # each pair says whether its replies were cut: the generator's flag for on-policy pairs, null for the others
    import pyarrow.parquet as pq

    rows = pq.read_table(project / "outputs" / "validated" / "rows.parquet", columns=["source", "completions"]).to_pylist()
    flags = {src: {c["finished"] for r in rows if r["source"] == src for c in r["completions"]} for src in {"on-policy", "llama-factory-demo"}}
    assert flags["on-policy"] and None not in flags["on-policy"] and flags["llama-factory-demo"] == {None}   # rate's flag got through
    pairs = [r for t in ("train", "test") for r in pq.read_table(project / "outputs" / "dataset" / f"{t}.parquet",
                                                                  columns=["source", "chosen_cut", "rejected_cut"]).to_pylist()]
    assert pairs and all(isinstance(r["chosen_cut"], bool) and isinstance(r["rejected_cut"], bool)
                         for r in pairs if r["source"] == "on-policy")
    assert all(r["chosen_cut"] is None and r["rejected_cut"] is None for r in pairs if r["source"] != "on-policy")
    released = project / "release" / "dataset"
    assert (released / "croissant.json").is_file() and (released / "data" / "eval_answers" / "test.parquet").is_file()
    # the signer pinned to the key this machine generated (outside the bundle); unpinned would exit 3
    audit = _openrelease(project, "audit", "release", "--public-key", ".openrelease/keys/signing-key.pub")
    assert audit.returncode == 0, (audit.stdout[-3000:], audit.stderr[-3000:])
    status = dvc(project, "status")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout

    # 2. a failed stage loses its outputs; dvc checkout restores them ------------------------------
    kept = ["metrics/eval.json", "lineage/evaluate.json", "plots/eval_pass_rates.png", "plots/eval_win_rate.png"]
    before = _outputs(project, kept)
    down = dvc(project, "repro", "-f", "-s", "evaluate",
               env=env_for(project, MLFLOW_TRACKING_URI="http://127.0.0.1:9"))  # nothing listens there
    assert down.returncode != 0 and "cannot be reached" in down.stdout + down.stderr, down.stderr[-2000:]
    assert not any((project / r).exists() for r in kept)  # DVC removed them before running the stage
    restored = dvc(project, "checkout")
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert _outputs(project, kept) == before

    # 3. release.yml: push, commit, tag; fresh clone of the tag; pull; publish; audit ---------------
    storage = tmp_path / "dvc-storage"
    for args in (("remote", "add", "-d", "local", str(storage)), ("push",)):
        r = dvc(project, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    git(project, "add", "-A")
    git(project, "commit", "-qm", "release v0.0.1")
    git(project, "tag", "v0.0.1")
    clone = tmp_path / "ci"
    subprocess.run(["git", "clone", "-q", "--branch", "v0.0.1", str(project), str(clone)], check=True)
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    status = dvc(clone, "status", "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    # nothing to rerun: the only absent outputs are the uncached caches, which nothing can pull and no
    # release reads (the dvc-status gate knows them)
    assert json.loads(status.stdout) == {"train": [{"changed outs": {"checkpoints": "deleted",
                                                                     "outputs/ref_logps": "deleted"}}],
                                         "evaluate": [{"changed outs": {"outputs/eval_cache": "deleted"}}]}
    lock_before = (clone / "dvc.lock").read_text()
    lineage_before = {p.name: sha256_file(p) for p in (clone / "lineage").glob("*.json")}
    assert {f"{s}.json" for s in STAGES} <= set(lineage_before)  # lineage records came from the remote

    from tests.hub_server import HubServer

    private, public = _signing_key(tmp_path)
    env = env_for(clone, HF_TOKEN=TOKEN, OPENRELEASE_SIGNING_KEY=str(private))
    env.pop("HF_HUB_OFFLINE")  # it blocks uploads even to localhost
    with HubServer(TOKEN) as hub:
        published = _openrelease(clone, "publish", "--endpoint", hub.url, "--to", str(tmp_path / "bundle"), env=env)
        assert published.returncode == 0, (published.stdout[-3000:], published.stderr[-3000:])
        for gate in ("git-clean", "git-version", "dvc-status", "validation", "lineage", "licenses", "secrets"):
            assert f"PASS {gate}" in published.stdout, gate
        assert f"model {MODEL_REPO}@v0.0.1: committed" in published.stdout
        # no stage ran: the clone's dvc.lock and lineage are the pulled ones, and no run record was written
        assert (clone / "dvc.lock").read_text() == lock_before
        assert {p.name: sha256_file(p) for p in (clone / "lineage").glob("*.json")} == lineage_before
        assert not (clone / ".openrelease" / "runs").exists()
        manifest = json.loads((tmp_path / "bundle" / "model" / "manifest.json").read_text())
        assert manifest["runs"] == {} and "train: no run record in .openrelease/runs (outputs from dvc pull or " \
            "another workspace)" in manifest["runs_missing"]

        audited = _openrelease(clone, "audit", MODEL_REPO, "--revision", "v0.0.1", "--endpoint", hub.url,
                               "--public-key", str(public), env=env)
        assert audited.returncode == 0, (audited.stdout[-3000:], audited.stderr[-3000:])
        assert "AUDIT PASSED" in audited.stdout

    # DVC's model registry sees the released model (dvc.yaml `artifacts:`), once the version is
    # registered with a GTO tag (annotated, `<artifact>@<version>`)
    git(project, "tag", "-a", "-m", "Registering artifact open-release-dpo version v0.0.1", "open-release-dpo@v0.0.1",
        "v0.0.1")
    got = dvc(clone, "artifacts", "get", str(project), "open-release-dpo", "--rev", "v0.0.1", "-o",
              str(tmp_path / "artifact"))
    assert got.returncode == 0, got.stderr[-2000:]
    assert sha256_file(tmp_path / "artifact" / "model.safetensors") == sha256_file(
        clone / "models" / "trained" / "model.safetensors")
