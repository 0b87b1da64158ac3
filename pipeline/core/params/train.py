"""The train section: LoRA, launcher, and the pass-through to trl.DPOConfig."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.params.base import Section


class LoraParams(Section):
    """LoRA adapters (peft). With LoRA the DPO reference is the base with adapters off: one weight copy."""

    enabled: bool = Field(description="Train LoRA adapters (true) or every weight (false, full fine-tuning).")
    r: int = Field(ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(gt=0, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        description="Modules that get adapters: 'all-linear' (every linear layer but the LM head) or a list of names.")


class LauncherParams(Section):
    """How the training processes are started."""

    kind: Literal["python", "accelerate"] = Field(
        description="python: train in the stage process; accelerate: the stage runs `accelerate launch` "
                    "with `config` and waits for it.")
    config: str | None = Field(default=None, description="accelerate config file (configs/accelerate/*.yaml); "
                                                         "required when kind is accelerate.")
    num_processes: int = Field(default=1, ge=1, le=4096,
                               description="Training processes in total (devices); overrides the config's.")

    @model_validator(mode="after")
    def _config_for_accelerate(self) -> LauncherParams:
        if self.kind == "accelerate" and not self.config:
            raise ValueError("kind is 'accelerate' but `config` (an accelerate config file) is not set")
        if self.kind == "python" and self.num_processes != 1:
            raise ValueError("kind 'python' runs one process; use kind 'accelerate' for num_processes > 1")
        return self


class TrainParams(Section):
    """DPO training. `dpo` passes through to trl.DPOConfig; the other keys are this project's."""

    dpo: dict[str, Any] = Field(
        description="Fields of trl.DPOConfig (beta, learning_rate, num_train_epochs, max_length, seed, ...), "
                    "checked by constructing DPOConfig when the train stage starts.")
    lora: LoraParams
    launcher: LauncherParams
    per_device_batch_size: int = Field(ge=1, le=65536, description="Preference pairs per device per micro-step.")
    global_batch_size: int = Field(
        ge=1, le=1_000_000, description="Pairs per optimizer step over all devices; gradient accumulation is "
                                        "derived from it, so it stays the same when the device count changes.")
    checkpoint_every: int = Field(ge=1, description="Save a resumable checkpoint every this many optimizer steps.")
    keep_checkpoints: int = Field(ge=1, le=1000, description="Newest complete checkpoints kept on disk.")
    length_grouping: bool = Field(description="Batch pairs of similar length together (less padding), "
                                              "shuffled per epoch from the seed.")
    completion_only_lm_head: bool = Field(
        description="On CPU, project only completion tokens through the LM head (TRL does this on CUDA only).")
    device: Literal["auto", "cpu", "cuda"] = Field(description="auto: CUDA when available, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on a CUDA GPU that has it (else fp16 with loss scaling), fp32 on CPU. "
                                    "bf16 on CPU is opt-in: torch's bfloat16 autocast, 1.41x fp32's tokens/s on the 2-core "
                                    "AVX512_BF16 CPU (bench_train, 2026-12-02), and other weights than fp32 gives; in the plan, so in lineage "
                                    "and the checkpoint and reference-cache keys.")
    packing: bool = Field(
        default=True, description="Run each micro-batch's real tokens as one padding-free row, attention per sequence "
                                  "(pipeline/train/packing.py; TRL 1.16 turns its own padding_free off for DPO). "
                                  "With SDPA only: other attention kernels train padded. In the plan, so in lineage "
                                  "and the checkpoint and reference-cache keys.")
    save_dtype: Literal["base", "float32", "bfloat16", "float16"] = Field(
        default="base", description="dtype of the saved merged weights (the LoRA adapter stays float32): base = the dtype the base "
                                    "model was published in (SOURCE.json original_dtype; bfloat16 for SmolLM2). "
                                    "Training runs in `precision`; evaluate upcasts what was saved to float32, so "
                                    "it scores exactly the released weights.")
    gradient_checkpointing: bool = Field(description="Recompute activations in backward (CUDA only; off on CPU).")
    liger: bool = Field(description="Liger kernels (CUDA only; needs liger-kernel installed).")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"] = Field(
        description="Attention kernel; auto: flash-attn on CUDA when installed, else SDPA.")
    torch_threads: int | None = Field(default=None, ge=1, le=1024,
                                      description="CPU threads per process; null: the cores this process may "
                                                  "use divided by the processes on this machine.")

    @field_validator("dpo")
    @classmethod
    def _dpo_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        managed = {
            "output_dir": "paths.checkpoints", "per_device_train_batch_size": "train.per_device_batch_size",
            "gradient_accumulation_steps": "train.global_batch_size", "save_steps": "train.checkpoint_every",
            "save_total_limit": "train.keep_checkpoints", "gradient_checkpointing": "train.gradient_checkpointing",
            "use_liger_kernel": "train.liger", "bf16": "train.device", "fp16": "train.device",
            "use_cpu": "train.device", "train_sampling_strategy": "train.length_grouping",
            "report_to": "tracking (the stage logs to MLflow itself)", "trust_remote_code": "never enabled",
            "model_init_kwargs": "train.attn_implementation", "push_to_hub": "the publish stage",
        }
        for key in v:
            if key in managed:
                raise ValueError(f"key {key!r} is set by the stage; use {managed[key]} instead")
        return v
