"""Deterministic content: two clean runs of one commit give one dvc.lock, and the pieces that make it so.

Run facts (times, hosts, commits, MLflow ids, durations) live in run records outside DVC's hashes;
the hash-order sources (safetensors metadata, PEFT's target_modules), matplotlib's and GX's stamps are
removed; `dirty` ignores what DVC itself rewrites; the reproduce path of a CI release has a gate.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.lineage import git_state, sha256_file
from pipeline.core.runs import read_run_records, write_run_record
from pipeline.release import gates as G
from tests.conftest import shared_data
from tests.helpers import configure_tiny, dvc, env_for, git, make_project_copy

LOCK = """schema: '2.0'
stages:
  build:
    cmd: python -m pipeline.stages.build
    outs:
    - path: outputs/dataset
      hash: md5
      md5: 1111.dir
  card:
    cmd: python -m pipeline.stages.card
    outs:
    - path: outputs/cards
      hash: md5
      md5: 2222.dir
"""


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "x.py").write_text("A = 1\n")
    (root / "outputs" / "dataset").mkdir(parents=True)
    (root / "outputs" / "dataset" / "tracked-by-mistake.txt").write_text("v1\n")
    (root / "dvc.lock").write_text(LOCK)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "c")
    return root


# -- dirty means dirty ---------------------------------------------------------------------------

def test_a_changed_dvc_lock_or_dvc_output_is_not_dirty(tmp_path):
    root = _repo(tmp_path)
    assert git_state(root)["dirty"] is False
    (root / "dvc.lock").write_text(LOCK.replace("1111", "9999"))
    (root / "outputs" / "dataset" / "tracked-by-mistake.txt").write_text("v2\n")  # inside an out dvc.lock lists
    state = git_state(root)
    assert state == {"commit": git(root, "rev-parse", "HEAD"), "dirty": False}


def test_a_changed_tracked_source_file_is_dirty(tmp_path):
    root = _repo(tmp_path)
    (root / "dvc.lock").write_text(LOCK.replace("1111", "9999"))
    (root / "pipeline" / "x.py").write_text("A = 2\n")
    assert git_state(root)["dirty"] is True
    git(root, "checkout", "pipeline/x.py")
    git(root, "mv", "pipeline/x.py", "pipeline/y.py")   # a rename is a change too (both paths counted)
    assert git_state(root)["dirty"] is True


def test_untracked_files_do_not_make_a_stage_dirty(tmp_path):
    root = _repo(tmp_path)
    (root / "notes.txt").write_text("scratch\n")
    assert git_state(root)["dirty"] is False


# -- the reproduce path: dvc-lock-reproduced ----------------------------------------------------

def test_reproduced_lock_gate_passes_on_an_equal_lock_and_ignores_release_stages(tmp_path):
    root = _repo(tmp_path)
    assert G.dvc_lock_reproduced(root).status == "pass"
    (root / "dvc.lock").write_text(LOCK.replace("2222", "8888"))  # card: rebuilt by the release itself
    r = G.dvc_lock_reproduced(root)
    assert r.status == "pass" and "1 stage(s) reproduced" in r.detail


def test_reproduced_lock_gate_fails_naming_stage_and_path(tmp_path):
    root = _repo(tmp_path)
    (root / "dvc.lock").write_text(LOCK.replace("1111", "9999"))
    r = G.dvc_lock_reproduced(root)
    assert r.status == "fail"
    assert r.detail == ("1 stage(s) did not reproduce the committed dvc.lock: build (out outputs/dataset)")
    (root / "dvc.lock").unlink()
    assert "no dvc.lock in the working tree" in G.dvc_lock_reproduced(root).detail


def test_reproduced_lock_gate_ignores_uncached_outputs_only(tmp_path):
    """A reused workspace's caches hold more than a fresh clone's: their hashes must not fail the gate."""
    root = tmp_path / "r"
    root.mkdir()
    lock = LOCK.replace("      md5: 1111.dir\n", "      md5: 1111.dir\n    - path: outputs/ref_logps\n      hash: md5\n"
                                                  "      md5: 3333.dir\n")
    (root / "dvc.lock").write_text(lock)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "c")
    (root / "dvc.lock").write_text(lock.replace("3333", "4444"))
    assert G.dvc_lock_reproduced(root, uncached={"outputs/ref_logps"}).status == "pass"
    assert G.dvc_lock_reproduced(root, uncached=set()).status == "fail"
    (root / "dvc.lock").write_text(lock.replace("3333", "4444").replace("1111", "9999"))
    r = G.dvc_lock_reproduced(root, uncached={"outputs/ref_logps"})
    assert r.status == "fail" and "build (out outputs/dataset)" in r.detail


def test_reproduced_lock_gate_fails_without_a_committed_lock(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_text("a")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "c")
    (root / "dvc.lock").write_text(LOCK)
    r = G.dvc_lock_reproduced(root)
    assert r.status == "fail" and "no dvc.lock committed at HEAD" in r.detail


# -- run records ---------------------------------------------------------------------------------

def test_run_record_is_used_only_for_the_lineage_record_it_belongs_to(tmp_path):
    lineage, runs = tmp_path / "lineage", tmp_path / "runs"
    lineage.mkdir()
    (lineage / "train.json").write_text('{"stage": "train"}\n')
    write_run_record(runs, "train", lineage / "train.json", {"mlflow": {"run_id": "r1"}})
    found, notes = read_run_records(runs, lineage, ["train", "evaluate"])
    assert found["train"]["mlflow"]["run_id"] == "r1" and found["train"]["host"]
    assert notes == ["evaluate: no run record in runs (outputs from dvc pull or another workspace)"]
    (lineage / "train.json").write_text('{"stage": "train", "other": 1}\n')  # e.g. a dvc checkout of another run
    found, notes = read_run_records(runs, lineage, ["train"])
    assert found == {} and "belongs to another run" in notes[0]


# -- byte-stable files ---------------------------------------------------------------------------

_SAVE = """
import json, sys, torch
from pathlib import Path
from pipeline.train.trainer import _save_atomic
key = {"zeta": "1", "alpha": "2", "mid": "3", "beta": "4", "q": "5"}
_save_atomic(Path(sys.argv[1]), {"x": torch.arange(3.0)}, json.dumps(key, sort_keys=True))
"""


def test_ref_logps_cache_file_bytes_do_not_depend_on_the_process(tmp_path):
    from safetensors import safe_open

    files = []
    for i in range(3):  # each process has its own Rust HashMap seed
        f = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", _SAVE, str(f)], check=True, env=env_for(Path.cwd()), timeout=300)
        files.append(sha256_file(f))
    assert len(set(files)) == 1
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert json.loads(f.metadata()["key"]) == {"alpha": "2", "beta": "4", "mid": "3", "q": "5", "zeta": "1"}


def test_adapter_config_target_modules_sorted_and_no_machine_path(tmp_path):
    from pipeline.train.checkpoints import stabilize_adapter_config

    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"],
                               "base_model_name_or_path": "/home/someone/proj/models/base", "r": 16}))
    stabilize_adapter_config(cfg, "models/base")
    out = json.loads(cfg.read_text())
    assert out == {"target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "base_model_name_or_path": "models/base",
                   "r": 16}


def test_checkpoint_drops_machine_specific_files(tmp_path):
    """Found by the two-repro test: the checkpoint's pickled training args and TRL's README name this
    machine's output_dir, so the checkpoints hash in dvc.lock differed between two clones."""
    from pipeline.train.checkpoints import is_complete, stabilize_checkpoint

    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ck / name).write_bytes(b"x")
    (ck / "trainer_state.json").write_text('{"global_step": 4}')
    (ck / "training_args.bin").write_bytes(b"/home/someone/proj/checkpoints")
    (ck / "README.md").write_text("base_model: /home/someone/proj/models/base\n")
    (ck / "adapter_config.json").write_text('{"target_modules": ["v_proj", "q_proj"]}')
    stabilize_checkpoint(ck, "models/base")
    assert sorted(p.name for p in ck.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                                                    "rng_state.pth", "scheduler.pt", "trainer_state.json"]
    assert is_complete(ck)  # still resumable


def test_gx_data_docs_are_byte_stable(tmp_path):
    import great_expectations as gx
    import pandas as pd

    from pipeline.data.validation import run_suite

    frame = pd.DataFrame({"a": [1, 2, None]})
    sites = []
    for name in ("one", "two"):
        exps = {"not_null": [gx.expectations.ExpectColumnValuesToNotBeNull(column="a")]}
        run_suite("rows", frame, exps, {"not_null": "quarantine"}, docs_dir=tmp_path / name)
        sites.append({p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                      for p in (tmp_path / name).rglob("*.html")})
    assert len(sites[0]) >= 3 and sites[0] == sites[1]


def test_eval_plots_are_byte_stable(tmp_path):
    from pipeline.eval.plots import write_plots

    metrics = {"n_test_prompts": 4, "n_general_prompts": 2, "length_ratio": 1.1, "judge_order_consistency": 0.5,
               "constraint_pass_rate_base": 0.3, "constraint_pass_rate_policy": 0.4, "n_wins": 1, "n_ties": 0, "n_losses": 1}
    for key, v in (("pass_rate_base", 0.2), ("pass_rate_policy", 0.3), ("win_rate", 0.5), ("pass_rate_delta", 0.1),
                   ("lc_win_rate", 0.5), ("constraint_pass_rate_delta", 0.1)):
        metrics |= {key: v, f"{key}_ci_low": v - 0.1, f"{key}_ci_high": v + 0.1}
    pngs = write_plots(metrics, tmp_path / "a")
    again = write_plots(metrics, tmp_path / "b")
    assert pngs and [sha256_file(p) for p in pngs] == [sha256_file(p) for p in again]
    assert all(b"Software" not in p.read_bytes() for p in pngs)  # no version string either


# -- the whole pipeline, twice -------------------------------------------------------------------

def _clone(src: Path, dest: Path, ref: str | None = None) -> Path:
    args = ["clone", "-q", *(["--branch", ref] if ref else []), str(src), str(dest)]
    subprocess.run(["git", *args], check=True, capture_output=True)
    return dest


@pytest.mark.slow
def test_two_clean_repros_of_one_commit_give_one_dvc_lock(tiny_model_dir, tmp_path):
    """Two fresh clones of one commit, `dvc repro` in each: the same dvc.lock, byte for byte (every
    stage, the release's own included). Then the reproduce path of a CI release: the second clone,
    moved onto the first one's committed and tagged dvc.lock, passes `--require-reproduced-lock`."""
    origin = make_project_copy(tmp_path / "origin")
    configure_tiny(origin, tiny_model_dir, shared_data("llama-factory", "dpo_en_demo.json"))
    git(origin, "commit", "-qam", "tiny config")
    locks = []
    for name in ("a", "b"):  # different folders too: no machine path may reach an output
        clone = _clone(origin, tmp_path / name)
        r = dvc(clone, "repro", timeout=1800)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        locks.append((clone / "dvc.lock").read_text())
    diff = "".join(difflib.unified_diff(locks[0].splitlines(True), locks[1].splitlines(True), "a", "b"))
    assert locks[0] == locks[1], diff[:6000]
    a, b = tmp_path / "a", tmp_path / "b"
    assert json.loads((a / "lineage" / "train.json").read_text()) == json.loads((b / "lineage" / "train.json").read_text())
    cfg = json.loads((a / "models" / "trained" / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and cfg["base_model_name_or_path"] == "models/base"

    git(a, "add", "dvc.lock")
    git(a, "commit", "-qm", "release v0.0.1")
    git(a, "tag", "v0.0.1")
    git(b, "fetch", "-q", "--tags", str(a))
    git(b, "reset", "-q", "v0.0.1")   # b's reproduction, at the tagged commit (index too, tree kept)
    ok = subprocess.run([str(Path(sys.executable).parent / "openrelease"), "publish", "--dry-run", "--strict",
                         "--require-reproduced-lock", "--to", str(tmp_path / "bundle")], cwd=b, env=env_for(b),
                        capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, (ok.stdout[-3000:], ok.stderr[-3000:])
    assert "PASS dvc-lock-reproduced" in ok.stdout and "PASS git-clean" in ok.stdout
