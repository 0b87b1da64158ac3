"""Stage `train`: DPO-tune the base model on the built preference dataset with TRL's DPOTrainer.

Reads:  params `train` (`train.dpo` passes through to trl.DPOConfig), `paths.base_model/`,
        `paths.dataset/train.parquet`.
Writes: `paths.model/` (merged safetensors model + tokenizer + config; `adapter/` when LoRA),
        `paths.checkpoints/` (DVC persist: a killed run resumes from the last complete checkpoint),
        `paths.ref_logps/` (reference log-probs cached by model and data hash; DVC persist),
        `paths.plots/train/` (metrics.csv + PNG curves), `paths.metrics/train.json`, the lineage record,
        and an MLflow LoggedModel linked to the dataset it was trained on.
Run:    `dvc repro train` (or `python -m pipeline.stages.train`).

Launchers (`train.launcher.kind`): `python` trains in this process (the CPU/laptop default);
`accelerate` makes this process run `accelerate launch --config_file <train.launcher.config>
--num_processes N -m pipeline.stages.train --worker <spec>` and wait. This process alone owns
tracking, lineage and the atomic output folders; the workers train, and rank 0 writes the model into
the folder this process gave it. The global batch (`train.global_batch_size`) is the same for any N:
gradient accumulation is derived from it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError, OpenReleaseError
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.params import TrainParams
from pipeline.core.rounds import ROUND_READS
from pipeline.core.shared import shared_cache_dir
from pipeline.core.stage import StageContext, stage_main

STAGE = "train"
READS = ["train", "paths.base_model", "paths.dataset", "paths.model", "paths.checkpoints", "paths.ref_logps",
         "paths.plots", "paths.metrics"]
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")

log = logging.getLogger(__name__)
# Facts of one execution, not of the inputs: kept out of metrics/train.json (see _body).
RUN_METRICS = ("train_runtime_s", "setup_s", "cpu_s", "peak_rss_mb", "peak_rss_train_mb", "peak_gpu_mem_mb", "tokens",
               "tokens_per_s", "tokens_per_s_with_setup", "resumed_from_step", "ref_logps_cache_hit")


def load_pairs(path: Path):
    """The preference pairs of one Parquet split as a datasets.Dataset (prompt, chosen, rejected)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    if not path.is_file():
        raise DataError(path, None, "file exists", "no such file (run `dvc repro build` first)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(path, None, "readable Parquet", str(e).splitlines()[0]) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(path, None, "DPO columns prompt/chosen/rejected", f"missing {missing}")
    if table.num_rows == 0:
        raise DataError(path, None, "at least one pair", "the split is empty")
    table = table.select(list(REQUIRED_COLUMNS))
    for i, row in enumerate(table.slice(0, min(table.num_rows, 100_000)).to_pylist()):
        for col in ("chosen", "rejected"):
            msgs = row[col]
            if not msgs or msgs[-1].get("role") != "assistant" or not str(msgs[-1].get("content", "")).strip():
                raise DataError(path, f"row {i}", f"{col} is one non-empty assistant message", repr(msgs)[:120])
        if not row["prompt"] or row["prompt"][-1].get("role") != "user":
            raise DataError(path, f"row {i}", "prompt ends with a user turn", repr(row["prompt"])[:120])
    return Dataset(table)


def _code_hash() -> str:
    """sha256 of this stage's source and every pipeline module it imports."""
    from pipeline.core.imports import code_sha256

    return code_sha256("pipeline.stages.train")


def fingerprint(p: TrainParams, model_sha256: str, data_sha256: str, *, root: Path | None = None,
                chat_template_sha256: str | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: params, inputs (weights and tokenizer are in the base
    model folder's sha256, the chat template also on its own), the launcher config, the code (import
    closure) and library versions. `run` adds the resolved plan (device, precision, attention kernel)."""
    from pipeline.core.fingerprint import library_versions
    from pipeline.core.lineage import sha256_file

    launcher = None
    if p.launcher.kind == "accelerate" and root is not None and (root / p.launcher.config).is_file():
        launcher = sha256_file(root / p.launcher.config)
    return {"train": p.model_dump(mode="json"), "base_model": model_sha256, "chat_template": chat_template_sha256,
            "train_data": data_sha256, "launcher_config": launcher, "code": _code_hash(),
            "versions": library_versions()}


def run_loss(history: list[dict[str, Any]]) -> float:
    """Mean training loss over every logged step of the run, a resumed one included: each logged `loss`
    is the mean over the steps since the previous log, so it is weighted by those steps. (transformers'
    `training_loss` counts only this process's steps: 0.0 after resuming from the final checkpoint.)"""
    prev, total = 0, 0.0
    for e in history:
        if "loss" in e and "step" in e and e["step"] > prev:
            total += float(e["loss"]) * (e["step"] - prev)
            prev = e["step"]
    return total / prev if prev else float("nan")


def _save_trained(trainer, p: TrainParams, out_dir: Path) -> None:
    """The trained adapter (LoRA) or full weights; every rank calls this (FSDP/ZeRO-3 gather here)."""
    trainer.save_model(str(out_dir / "adapter" if p.lora.enabled else out_dir))


def _finish_release(p: TrainParams, base_dir: Path, out_dir: Path, base_ref: str, tokenizer) -> None:
    """Main process, after the trainer is freed: merge the adapter into a fresh base model (so the
    release is plain safetensors weights of the base architecture), add the tokenizer, drop the rest."""
    import torch

    from pipeline.lm.loading import load_causal_lm
    from pipeline.lm.portable import make_portable, name_hub_base, resolve_save_dtype

    adapter_dir = out_dir / "adapter"
    save_dtype = resolve_save_dtype(p.save_dtype, base_dir)
    if p.lora.enabled:
        from peft import PeftModel

        from pipeline.train.checkpoints import stabilize_adapter_config

        # not this machine's absolute path, and target_modules sorted (PEFT writes a set's order)
        stabilize_adapter_config(adapter_dir / "adapter_config.json", base_ref)
        merged = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype=torch.float32), adapter_dir).merge_and_unload()
        # merged in float32, then rounded once to the saved dtype; the adapter stays float32 (its small
        # low-rank deltas are what bf16 rounding would lose, and it is ~2 MB)
        merged.to(getattr(torch, save_dtype)).save_pretrained(out_dir, safe_serialization=True)
        name_hub_base(adapter_dir / "adapter_config.json", base_dir)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (adapter_dir / f).unlink(missing_ok=True)  # the tokenizer lives once, beside the merged model
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # pickle; the resolved config is in JSON
    elif save_dtype != "float32":  # full fine-tuning saved float32 weights above: round them once
        load_causal_lm(out_dir, dtype=torch.float32).to(getattr(torch, save_dtype)).save_pretrained(
            out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    make_portable(out_dir)  # the same answers under transformers 4.x (rope_theta, tokenizer class)
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    for readme in (out_dir / "README.md", adapter_dir / "README.md"):
        readme.unlink(missing_ok=True)  # auto-generated cards; the card stage writes the real one


def run(p: TrainParams, *, root: Path, base_dir: Path, dataset_dir: Path, out_dir: Path, checkpoints_dir: Path,
        ref_logps_dir: Path, plots_dir: Path, model_sha256: str, base_ref: str, fingerprint: dict[str, Any],
        log_fn=None, max_steps: int | None = None) -> dict[str, Any] | None:
    """Train and write the release into `out_dir` and curves into `plots_dir`.

    Returns the result (metrics, resolved config, plan, hardware) on the main process, None elsewhere.
    """
    import torch
    from accelerate import PartialState

    from pipeline.lm.loading import load_causal_lm, load_tokenizer
    from pipeline.train import checkpoints, packing
    from pipeline.train.report import MetricsCallback, hardware, peak_rss_mb, step_rows, write_plots
    from pipeline.train.setup import build_dpo_config, lora_config, make_plan
    from pipeline.train.trainer import OpenReleaseDPOTrainer, completion_only_lm_head

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = make_plan(p, root, world_size=world, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    cfg = build_dpo_config(p, plan, checkpoints_dir, max_steps=max_steps)  # also sets up the process group
    state = PartialState()
    log.info("plan: %s", plan.to_dict())
    log.info("effective global batch = %d devices x %d per device x %d accumulation = %d pairs per step",
             plan.world_size, plan.per_device_batch_size, plan.grad_accumulation, plan.global_batch_size)
    fingerprint = {**fingerprint, "plan": plan.to_dict()}  # device, precision, attention kernel, batch layout
    restart_reason = None
    if state.is_main_process:
        restart_reason = checkpoints.prepare_run(checkpoints_dir, fingerprint).restart_reason
    state.wait_for_everyone()
    resume = checkpoints.last_complete(checkpoints_dir)

    train = load_pairs(dataset_dir / "train.parquet")
    tokenizer = load_tokenizer(base_dir)
    attention = packing.register_attention() if plan.packing else plan.attn_implementation
    model = load_causal_lm(base_dir, attn_implementation=attention, dtype=torch.float32)
    precompute = bool(cfg.precompute_ref_log_probs)
    callback = MetricsCallback(log_fn)
    stable = checkpoints.stable_checkpoint_callback(base_ref)
    with completion_only_lm_head(p.completion_only_lm_head and plan.device == "cpu"):
        t0, cpu0 = time.monotonic(), time.process_time()
        trainer = OpenReleaseDPOTrainer(
            model=model, args=cfg, train_dataset=train, processing_class=tokenizer, peft_config=lora_config(p),
            callbacks=[callback, stable], length_grouping=p.length_grouping, packing=plan.packing,
            ref_cache_dir=ref_logps_dir if precompute else None,
            ref_cache_key={"model": model_sha256, "chat_template": fingerprint["chat_template"]})
        setup_s = time.monotonic() - t0
        t1 = time.monotonic()
        if resume is not None and checkpoints.is_final(resume):
            # transformers resumed at max_steps trains one step more; the final checkpoint is the result
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(resume))
            trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
            output = None
        else:
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_s, cpu_s = time.monotonic() - t1, time.process_time() - cpu0
    peak_train_mb = peak_rss_mb()
    _save_trained(trainer, p, out_dir)
    if not state.is_main_process:
        return None
    history, global_step, epoch = trainer.state.log_history, trainer.state.global_step, trainer.state.epoch
    ref_events, world_size, resolved = trainer.ref_cache_events, cfg.world_size, json.loads(cfg.to_json_string())
    del trainer, model  # free the training memory before a fresh base model is loaded for the merge
    gc.collect()
    _finish_release(p, base_dir, out_dir, base_ref, tokenizer)

    rows = step_rows(history)
    write_plots(rows, plots_dir)
    checkpoints.prune(checkpoints_dir, checkpoints.last_complete(checkpoints_dir))
    last = rows[-1] if rows else {}
    resumed_from_step = checkpoints.checkpoint_step(resume) if resume else 0
    trained_steps = global_step - resumed_from_step
    # TRL counts tokens (non-padding, all ranks) from the start of this process, so the rate is this run's.
    tokens = float(last.get("num_tokens", 0.0)) if trained_steps > 0 else float("nan")
    metrics = {
        "train_loss": run_loss(history), "train_loss_this_process": float(output.training_loss) if output else 0.0,
        "final_loss": last.get("loss", float("nan")),
        **{k.replace("/", "_"): v for k, v in last.items() if k.startswith(("rewards/", "logps/"))},
        "steps": global_step, "epochs": float(epoch or 0), "pairs": len(train),
        "world_size": world_size, "per_device_batch_size": plan.per_device_batch_size,
        "grad_accumulation": plan.grad_accumulation, "global_batch_size": plan.global_batch_size,
        "train_runtime_s": train_s, "setup_s": setup_s, "cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb(),
        "peak_rss_train_mb": peak_train_mb,
        "tokens": tokens, "tokens_per_s": tokens / train_s if train_s > 0 else float("nan"),
        "tokens_per_s_with_setup": tokens / (setup_s + train_s),  # the reference pass counted
        "resumed": float(resume is not None), "resumed_from_step": resumed_from_step, "steps_this_run": trained_steps,
        "ref_logps_cache_hit": float(all(e["hit"] for e in ref_events)) if ref_events else float("nan"),
    }
    if plan.device == "cuda":
        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {"metrics": metrics, "plan": plan.to_dict(), "dpo_config": resolved,
            "hardware": hardware(), "resumed_from": resume.name if resume else None,
            "resume": {"resumed": resume is not None, "resumed_from_step": resumed_from_step,
                       "steps_total": global_step, "steps_this_run": trained_steps, "restart_reason": restart_reason},
            "ref_logps": ref_events, "world_size": world_size}


# -- launching -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_accelerate(p: TrainParams, root: Path, spec: dict[str, Any], workdir: Path,
                      expect_result: bool = True) -> dict[str, Any]:
    """Run the training under `accelerate launch` and return rank 0's result."""
    from pipeline.train.setup import read_accelerate_config

    acc_cfg = read_accelerate_config(root / p.launcher.config)
    spec_file, result_file = workdir / "spec.json", workdir / "result.json"
    atomic_write_json(spec_file, {**spec, "result": str(result_file)})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / p.launcher.config),
           "--num_processes", str(p.launcher.num_processes)]
    if int(acc_cfg.get("num_machines", 1) or 1) == 1 and "main_process_port" not in acc_cfg:
        cmd += ["--main_process_port", str(_free_port())]  # parallel runs on one machine must not collide
    cmd += ["-m", "pipeline.stages.train", "--worker", str(spec_file)]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, check=False)
    if proc.returncode != 0:
        raise OpenReleaseError(f"train: `accelerate launch` exited with status {proc.returncode} (see the log above)")
    if not expect_result:
        return {}
    if not result_file.is_file():
        raise OpenReleaseError("train: the training processes exited without a result from rank 0")
    return json.loads(result_file.read_text(encoding="utf-8"))


def _worker(spec_file: str) -> None:
    """Entry point of each `accelerate launch` process."""
    from pipeline.core.stage import configure_logging

    configure_logging()
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    try:
        p = TrainParams.model_validate(spec["train"])
        log_fn = None
        if spec.get("run_id") and int(os.environ.get("RANK", "0")) == 0:
            from pipeline.core.tracking import run_metrics_logger

            log_fn = run_metrics_logger(spec["run_id"], spec["root"])
        result = run(p, root=Path(spec["root"]), log_fn=log_fn,
                     **{k: Path(spec[k]) for k in ("base_dir", "dataset_dir", "out_dir", "checkpoints_dir",
                                                   "ref_logps_dir", "plots_dir")},
                     model_sha256=spec["model_sha256"], base_ref=spec["base_ref"],
                     fingerprint=spec["fingerprint"], max_steps=spec.get("max_steps"))
    except OpenReleaseError as e:
        print(f"{STAGE} (rank {os.environ.get('RANK', '0')}): error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if result is not None:
        atomic_write_json(spec["result"], result)


# -- the stage -------------------------------------------------------------------------------------------
def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, no NaN (DVC and JSON readers choke on it)."""
    import math

    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _body(ctx: StageContext) -> None:

    p = ctx.params.train
    base_dir, dataset_dir = ctx.path("base_model"), ctx.path("dataset")
    base_art = ctx.add_input(base_dir, name="base_model", log_dataset=False)
    train_file = dataset_dir / "train.parquet"
    train_rows = len(load_pairs(train_file))
    data_art = ctx.add_input(train_file, rows=train_rows, name="train.parquet")
    from pipeline.core.rounds import template_record_dir
    from pipeline.lm.template import check_template_dir

    template_sha = check_template_dir(base_dir, template_record_dir(ctx), "train")  # the base model's record, every round
    ctx.record.extra["chat_template_sha256"] = template_sha
    fp = fingerprint(p, base_art.sha256, data_art.sha256, root=ctx.root, chat_template_sha256=template_sha)
    plots_dir = ctx.path("plots") / "train"
    with atomic_dir(ctx.path("model")) as out_tmp, atomic_dir(plots_dir) as plots_tmp:
        spec = {"root": str(ctx.root), "base_dir": str(base_dir), "dataset_dir": str(dataset_dir),
                "out_dir": str(out_tmp), "checkpoints_dir": str(ctx.path("checkpoints")),
                "ref_logps_dir": str(shared_cache_dir(ctx.root, ctx.params.paths.ref_logps)), "plots_dir": str(plots_tmp),
                "model_sha256": base_art.sha256, "base_ref": ctx.params.paths.base_model, "fingerprint": fp}
        if p.launcher.kind == "python":
            result = run(p, log_fn=ctx.log_metrics, root=ctx.root, model_sha256=base_art.sha256,
                         base_ref=ctx.params.paths.base_model, fingerprint=fp,
                         **{k: Path(spec[k]) for k in ("base_dir", "dataset_dir", "out_dir", "checkpoints_dir",
                                                       "ref_logps_dir", "plots_dir")})
        else:
            spec.update(train=p.model_dump(mode="json"), run_id=ctx.run.run_id)
            with tempfile.TemporaryDirectory(prefix=f".{STAGE}-launch-", dir=out_tmp.parent) as work:
                result = launch_accelerate(p, ctx.root, spec, Path(work))
    metrics = _flat_metrics(result["metrics"])
    # seconds, memory, token rates, resume and cache facts differ between two runs of the same inputs:
    # MLflow and the run record get them, metrics/train.json (a DVC output) does not
    run_metrics = {k: metrics.pop(k) for k in RUN_METRICS if k in metrics}
    metrics_file = ctx.path("metrics") / "train.json"
    atomic_write_json(metrics_file, metrics)
    ctx.log_metrics(metrics)
    ctx.log_run_metrics(run_metrics)
    ctx.add_output(ctx.path("model"))
    ctx.add_output(plots_dir)
    ctx.add_output(metrics_file)
    dpo_config = {k: (Path(v).relative_to(ctx.root).as_posix() if isinstance(v, str) and v.startswith(f"{ctx.root}/")
                      else v) for k, v in result["dpo_config"].items()}  # output_dir: no machine path
    # Why older checkpoints were discarded depends on what this workspace held before (and names its
    # path): a run fact, so a fresh clone and a reused workspace write the same lineage.
    resume = dict(result["resume"])
    restart_reason = resume.pop("restart_reason", None)
    ctx.record.extra.update(train={"plan": result["plan"], "dpo_config": dpo_config, "hardware": result["hardware"],
                                   "resume": resume, "world_size": result["world_size"]})
    ctx.run_facts.update(train={**{k: result[k] for k in ("resumed_from", "ref_logps")}, "restart_reason": restart_reason})
    ctx.run.log_artifact(plots_dir, artifact_path="plots")
    ctx.run.set_tags({f"hardware.{k}": v for k, v in result["hardware"].items()})
    with tempfile.TemporaryDirectory() as tmp:
        config_file = atomic_write_json(Path(tmp) / "dpo_config.json", result["dpo_config"])
        ctx.run.log_artifact(config_file, artifact_path="config")
    model_id = ctx.run.register_logged_model(
        "dpo-model", params={"plan": result["plan"], "lora": p.lora.model_dump(mode="json")},
        tags={"openrelease.model_dir": ctx.params.paths.model, "openrelease.base_model_sha256": base_art.sha256},
        inputs=[(train_file, data_art.sha256)])
    ctx.run_facts["mlflow_model_id"] = model_id
    log.info("trained %d steps; model in %s (MLflow LoggedModel %s)", metrics.get("steps", 0),
             ctx.params.paths.model, model_id)


def _secondary() -> None:
    """`python -m pipeline.stages.train --secondary` on the other machines of a multi-node run: launch
    this machine's workers with the same params; only global rank 0 (on the main machine, started by
    `dvc repro train`) tracks and writes outputs. Checkpoints resume only from a shared filesystem."""
    from pipeline.core.lineage import sha256_path
    from pipeline.core.params import load_params
    from pipeline.core.stage import configure_logging

    configure_logging()
    root = Path.cwd()
    try:
        params = load_params(root / "params.yaml")
        p, paths = params.train, params.paths
        if p.launcher.kind != "accelerate":
            raise OpenReleaseError("train --secondary needs train.launcher.kind: accelerate (a multi-node config)")
        base, data = root / paths.base_model, root / paths.dataset / "train.parquet"
        from pipeline.lm.template import check_template_dir

        model_sha, data_sha = sha256_path(base), sha256_path(data)
        template_sha = check_template_dir(base, base, "train --secondary")
        scratch = root / ".openrelease" / "train-secondary"
        spec = {"root": str(root), "base_dir": str(base), "dataset_dir": str(root / paths.dataset),
                "out_dir": str(scratch / "model"), "checkpoints_dir": str(root / paths.checkpoints),
                "ref_logps_dir": str(root / paths.ref_logps), "plots_dir": str(scratch / "plots"),
                "model_sha256": model_sha, "base_ref": paths.base_model, "train": p.model_dump(mode="json"),
                "fingerprint": fingerprint(p, model_sha, data_sha, root=root, chat_template_sha256=template_sha)}
        scratch.mkdir(parents=True, exist_ok=True)
        launch_accelerate(p, root, spec, scratch, expect_result=False)
    except OpenReleaseError as e:
        print(f"{STAGE}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage train_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "train_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    if sys.argv[1:] == ["--secondary"]:
        _secondary()
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    from pipeline.core.runtime import tune

    tune()  # allocator and OpenMP wait policy, before torch is imported
    main()
