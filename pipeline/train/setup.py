"""Turn the `train` params into what TRL needs: a checked DPOConfig, a LoRA config, device settings.

`train.dpo` passes through to `trl.DPOConfig` unchanged; this module adds only what the stage owns
(output folder, batch arithmetic, precision, checkpoint cadence, sampler) and refuses combinations TRL
cannot run, with a ParamsError naming the key. Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ParamsError
from pipeline.core.params import TrainParams

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Where and how the training runs: the numbers that are logged and kept constant across devices."""

    device: str  # "cpu" | "cuda"
    world_size: int  # processes in total
    local_processes: int  # processes on this machine
    per_device_batch_size: int
    grad_accumulation: int
    global_batch_size: int
    torch_threads: int | None
    attn_implementation: str
    precision: str  # "fp32" (CPU) | "bf16" | "fp16"
    packing: bool  # padding-free micro-batches with per-sequence SDPA (pipeline/train/packing.py)
    gradient_checkpointing: bool
    liger: bool
    distributed_type: str  # from the accelerate config ("NO" for the python launcher)
    fsdp_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cores_available() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_accelerate_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"train.launcher.config = {str(path)!r}: no such file (see configs/accelerate/)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"train.launcher.config = {str(path)!r}: invalid YAML: {e}") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise ParamsError(f"train.launcher.config = {str(path)!r}: not an accelerate config (no distributed_type)")
    return cfg


def derive_accumulation(global_batch: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation that keeps `global_batch` pairs per optimizer step on `world_size` devices."""
    per_step = per_device * world_size
    if global_batch % per_step:
        raise ParamsError(
            f"train.global_batch_size = {global_batch} is not a multiple of per_device_batch_size x devices "
            f"= {per_device} x {world_size} = {per_step}; change one of them so accumulation is a whole number")
    return global_batch // per_step


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def make_plan(p: TrainParams, root: Path, *, world_size: int | None = None,
              local_processes: int | None = None) -> Plan:
    """Resolve device, batch arithmetic and kernels. `world_size` defaults to the launcher's process count."""
    import torch

    cuda = torch.cuda.is_available()
    if p.device == "cuda" and not cuda:
        raise ParamsError("train.device = 'cuda' but no CUDA device is visible (use 'auto' or 'cpu')")
    device = "cuda" if (p.device == "cuda" or (p.device == "auto" and cuda)) else "cpu"
    acc_cfg = read_accelerate_config(root / p.launcher.config) if p.launcher.kind == "accelerate" else {}
    dist_type = str(acc_cfg.get("distributed_type", "NO"))
    fsdp_version = None
    if dist_type == "FSDP":
        fsdp_version = int((acc_cfg.get("fsdp_config") or {}).get("fsdp_version", 1))
    world = world_size or p.launcher.num_processes
    local = local_processes or max(1, world // int(acc_cfg.get("num_machines", 1) or 1))
    accumulation = derive_accumulation(p.global_batch_size, p.per_device_batch_size, world)

    if device == "cpu":
        if p.gradient_checkpointing:
            log.info("train.gradient_checkpointing ignored on CPU (memory is not the limit there; it costs ~30%)")
        if p.liger:
            raise ParamsError("train.liger = true needs CUDA (Liger kernels are Triton GPU kernels); set it false")
        if dist_type in ("FSDP", "DEEPSPEED"):
            raise ParamsError(f"train.launcher.config: {dist_type} needs GPUs; use configs/accelerate/ddp.yaml on CPU")
    if p.attn_implementation == "auto":
        attn = "flash_attention_2" if device == "cuda" and _flash_attn_installed() else "sdpa"
    else:
        attn = p.attn_implementation
        if attn.startswith("flash_attention") and (device != "cuda" or not _flash_attn_installed()):
            raise ParamsError(f"train.attn_implementation = {attn!r} needs CUDA and the flash-attn package")
    if device == "cuda" and p.liger and importlib.util.find_spec("liger_kernel") is None:
        raise ParamsError("train.liger = true but the liger-kernel package is not installed "
                          "(pip install liger-kernel), or set it false")
    if p.precision == "auto":
        precision = "fp32"
        if device == "cuda":  # bf16 autocast where the GPU has it (Ampere+), else fp16 with loss scaling
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif p.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ParamsError("train.precision = 'bf16' but this GPU has no bfloat16; use 'auto' (fp16 with loss scaling)")
    else:
        precision = p.precision
    packing = p.packing and attn == "sdpa"
    if p.packing and not packing:
        log.info("train.packing ignored with attn_implementation %r: it replaces SDPA only", attn)
    threads = p.torch_threads or (max(1, cores_available() // local) if device == "cpu" else None)
    return Plan(device=device, world_size=world, local_processes=local,
                per_device_batch_size=p.per_device_batch_size, grad_accumulation=accumulation,
                global_batch_size=p.global_batch_size, torch_threads=threads, attn_implementation=attn,
                precision=precision, packing=packing,
                gradient_checkpointing=p.gradient_checkpointing and device == "cuda",
                liger=p.liger and device == "cuda", distributed_type=dist_type, fsdp_version=fsdp_version)


def _type_ok(value: Any, annotation: Any) -> bool:
    """A light check of a YAML value against a DPOConfig field annotation (dataclasses do not check)."""
    if annotation is Any or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(annotation, type):
        if issubclass(annotation, str) and not isinstance(value, str):
            return False  # enums (IntervalStrategy, ...) are str subclasses and are given as strings
        return isinstance(value, annotation) or issubclass(annotation, str) or not isinstance(value, (dict, list))
    return True


def check_dpo_keys(dpo: dict[str, Any]) -> None:
    """Unknown field or wrong type in `train.dpo` -> ParamsError naming `train.dpo.<key>`."""
    from trl import DPOConfig

    fields = {f.name: f for f in dataclasses.fields(DPOConfig) if f.init}
    hints = typing.get_type_hints(DPOConfig)
    for key, value in dpo.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ParamsError(f"params.yaml: train.dpo.{key}: not a field of trl.DPOConfig{hint}")
        if not _type_ok(value, hints.get(key, Any)):
            raise ParamsError(f"params.yaml: train.dpo.{key} = {value!r}: wrong type, DPOConfig expects {hints[key]}")


def build_dpo_config(p: TrainParams, plan: Plan, output_dir: str | Path, *, max_steps: int | None = None):
    """trl.DPOConfig from `train.dpo` plus the stage-owned fields. Raises ParamsError on anything TRL refuses."""
    from trl import DPOConfig

    check_dpo_keys(p.dpo)
    check_compatible(p, plan)
    owned: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.grad_accumulation,
        "save_strategy": "steps",
        "save_steps": p.checkpoint_every,
        "save_total_limit": p.keep_checkpoints,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "use_liger_kernel": plan.liger,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        "use_cpu": plan.device == "cpu",
        "report_to": [],  # the stage's own callback logs to MLflow (pipeline.core.tracking owns mlflow)
        "disable_tqdm": False,  # progress bar with ETA, also when logging is quiet
        "dataloader_pin_memory": plan.device == "cuda",
        "trust_remote_code": False,
        "push_to_hub": False,
    }
    kwargs = {**p.dpo, **owned}
    kwargs.setdefault("ddp_find_unused_parameters", False)  # every trainable parameter gets a gradient
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    try:
        return DPOConfig(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParamsError(f"params.yaml: train.dpo is rejected by trl.DPOConfig: {first}") from None


def check_compatible(p: TrainParams, plan: Plan) -> None:
    """Refuse the combinations TRL 1.16 cannot run, before any model is loaded."""
    precompute = bool(p.dpo.get("precompute_ref_log_probs", False))
    if precompute and plan.liger:
        raise ParamsError("train.liger = true cannot be combined with train.dpo.precompute_ref_log_probs = true "
                          "(TRL's Liger DPO loss computes the reference pass itself); turn one of them off")
    if precompute and plan.distributed_type == "FSDP" and plan.fsdp_version == 2:
        raise ParamsError("train.dpo.precompute_ref_log_probs = true is not supported under FSDP2 "
                          f"(train.launcher.config = {p.launcher.config}); set it false or use DDP/ZeRO-3")
    if p.dpo.get("sync_ref_model") and p.lora.enabled:
        raise ParamsError("train.dpo.sync_ref_model = true does not work with LoRA (train.lora.enabled); "
                          "the reference is the base with adapters off")


def lora_config(p: TrainParams):
    """peft.LoraConfig for `train.lora`, or None for full fine-tuning."""
    if not p.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                      target_modules=p.lora.target_modules, task_type="CAUSAL_LM", bias="none")
