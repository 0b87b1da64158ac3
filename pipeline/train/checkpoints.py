"""Resumable training checkpoints: find the last complete one, drop partial ones, refuse stale ones.

The checkpoint folder is a DVC `persist: true` output, so it survives a killed `dvc repro`. A run may
only resume from checkpoints made with the same inputs, params, code and libraries: a fingerprint of
those is stored beside them (RUN.json), and a different fingerprint empties the folder first.

A checkpoint is complete when transformers wrote all of it: `trainer_state.json` is written last, so it
must parse and name the folder's step, and the weights, optimizer, scheduler and RNG files must exist.
A SIGKILL during a checkpoint write or a rotation leaves a folder that fails this check; it is deleted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_json

log = logging.getLogger(__name__)

RUN_FILE = "RUN.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """Whether `path` holds everything `Trainer.train(resume_from_checkpoint=...)` needs."""
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    names = {p.name for p in path.iterdir()}
    has_weights = any(w in names for w in _WEIGHTS) or any(n.startswith("pytorch_model_fsdp") for n in names)
    has_optimizer = "optimizer.pt" in names or any(n.startswith(("optimizer_", "global_step")) for n in names)
    deepspeed = any(n.startswith("global_step") for n in names)  # DeepSpeed keeps its scheduler in there
    has_scheduler = "scheduler.pt" in names or deepspeed
    has_rng = any(n.startswith("rng_state") for n in names)
    return has_weights and has_optimizer and has_scheduler and has_rng


def is_final(path: Path) -> bool:
    """Whether a complete checkpoint already holds the last planned step (nothing is left to train)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return int(state.get("max_steps") or 0) > 0 and int(state.get("global_step", 0)) >= int(state["max_steps"])


def last_complete(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return max(done, key=checkpoint_step) if done else None


@dataclass(frozen=True)
class ResumeDecision:
    """What `prepare_run` found: the checkpoint to resume from, and why older checkpoints were dropped."""

    resume: Path | None
    restart_reason: str | None  # None: nothing was discarded


def prepare_run(folder: Path, fingerprint: dict[str, Any]) -> ResumeDecision:
    """Make `folder` hold only complete checkpoints of this exact run; say which one to resume from.

    Checkpoints made for another fingerprint (other inputs, params, code, libraries, device, precision)
    are never resumed: they are deleted and the reason names the parts that differ. Call on the main
    process only, before training starts.
    """
    from pipeline.core.fingerprint import key_diff

    folder.mkdir(parents=True, exist_ok=True)
    run_file = folder / RUN_FILE
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else None
    except (OSError, ValueError):
        previous = "<unreadable>"
    if previous != fingerprint:
        stale = [p for p in folder.iterdir() if p.name != RUN_FILE]
        reason = None
        if stale:
            diff = key_diff(previous, fingerprint) if isinstance(previous, dict) else [f"{RUN_FILE}: {previous}"]
            reason = (f"checkpoints in {folder} were made for other inputs/params/code ("
                      f"{'; '.join(diff[:4])}{f'; {len(diff) - 4} more' if len(diff) > 4 else ''}): starting over")
            log.warning("%s", reason)
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        atomic_write_json(run_file, fingerprint)
        return ResumeDecision(None, reason)
    for p in sorted(folder.iterdir()):
        if checkpoint_step(p) is not None and not is_complete(p):
            log.warning("removing incomplete checkpoint %s (interrupted while it was written)", p.name)
            shutil.rmtree(p, ignore_errors=True)
    resume = last_complete(folder)
    if resume is not None:
        log.info("resuming from %s", resume)
    return ResumeDecision(resume, None)


def prepare(folder: Path, fingerprint: dict[str, Any]) -> Path | None:
    """`prepare_run`, returning only the checkpoint to resume from."""
    return prepare_run(folder, fingerprint).resume


def prune(folder: Path, keep: Path | None) -> None:
    """After a successful run keep only `keep` (the final checkpoint) beside RUN.json."""
    for p in folder.iterdir():
        if checkpoint_step(p) is not None and p != keep:
            shutil.rmtree(p, ignore_errors=True)
    (folder / "README.md").unlink(missing_ok=True)  # TRL's auto model card; the card stage writes the real one


def stabilize_adapter_config(cfg_file: Path, base_ref: str) -> None:
    """Make a PEFT adapter_config.json depend only on its content: PEFT writes `target_modules` from a
    set (a different order in every process) and the base model's absolute path on this machine."""
    if not cfg_file.is_file():
        return
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if "base_model_name_or_path" in cfg:
        cfg["base_model_name_or_path"] = base_ref
    atomic_write_json(cfg_file, cfg)


def stabilize_checkpoint(path: Path, base_ref: str) -> None:
    """A checkpoint folder's hash is in dvc.lock: sort its adapter config and drop the two files that
    name this machine's paths and that resuming does not read: `training_args.bin` (a pickle of the
    arguments, output_dir included) and TRL's auto-generated README.md."""
    stabilize_adapter_config(path / "adapter_config.json", base_ref)
    for name in ("training_args.bin", "README.md"):
        (path / name).unlink(missing_ok=True)


def stable_checkpoint_callback(base_ref: str):
    """A TrainerCallback that applies `stabilize_checkpoint` to each checkpoint as it is saved."""
    from transformers import TrainerCallback

    class StableCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                stabilize_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", base_ref)

    return StableCheckpoints()
