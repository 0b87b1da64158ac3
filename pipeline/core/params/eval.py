"""The evaluate section: generation, prompt sets, judges, bootstrap."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.params.base import Section


class EvalGenerationParams(Section):
    """Greedy decoding for the evaluation generations (base and trained model alike)."""

    max_new_tokens: int = Field(ge=1, le=8192, description="Longest response generated per prompt, in tokens.")
    batch_size: int = Field(ge=1, le=4096, description="Prompts per generate() call (left-padded batch).")
    precision: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Weights the greedy generations decode with: float32 as loaded, or a bfloat16 copy "
                                       "(opt-in: faster on CPUs with AVX512_BF16, changes some responses; recorded in lineage, the "
                                       "cache keys and the card). Log-probs and KL are always scored in the loaded precision.")


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


class VerdictParams(Section):
    """The strings a judge answers with. MT-Bench's pair-v2 prompt: a "[[A]]", b "[[B]]", tie "[[C]]"."""

    a: str = Field(default="A", min_length=1, description="Verdict meaning the first answer (A) is better.")
    b: str = Field(default="B", min_length=1, description="Verdict meaning the second answer (B) is better.")
    tie: str | None = Field(default=None, min_length=1, description="Verdict meaning a tie; null: the prompt has none.")

    @model_validator(mode="after")
    def _distinct(self) -> VerdictParams:
        used = [v for v in (self.a, self.b, self.tie) if v]
        if len(set(used)) != len(used):
            raise ValueError(f"verdicts must differ, got {used}")
        return self

    def as_tuple(self) -> tuple[str, str, str | None]:
        return (self.a, self.b, self.tie)


class PlaceholderParams(Section):
    """The placeholder strings in the judge template (MT-Bench: {question}, {answer_a}, {answer_b})."""

    instruction: str = Field(default="{instruction}", min_length=1, description="Replaced by the user request.")
    response_a: str = Field(default="{response_a}", min_length=1, description="Replaced by the answer shown first.")
    response_b: str = Field(default="{response_b}", min_length=1, description="Replaced by the answer shown second.")


class JudgeParams(Section):
    kind: Literal["local", "openai"] = Field(description="Which judge in pipeline.eval.judges.JUDGES to use.")
    local: LocalJudgeParams
    openai: OpenAIJudgeParams | None = None
    lc_c: float = Field(gt=0, description="Inverse L2 strength on the length slope of the LC win-rate regression.")
    lc_n_resamples: int = Field(default=999, ge=100, le=100_000, description="Bootstrap resamples (each refits "
                                "the GLM) for the LC win rate's interval.")
    min_order_consistency: float = Field(default=0.6, ge=0, le=1, description="Below this share of pairs decided "
                                         "the same way in both orders the judge is unreliable: its win rates stay "
                                         "out of model-index and every gate.")
    verdicts: VerdictParams = Field(default_factory=VerdictParams, description="What the judge answers with.")
    placeholders: PlaceholderParams = Field(default_factory=PlaceholderParams,
                                            description="Placeholder strings in paths.judge_template.")

    @model_validator(mode="after")
    def _chosen_block_present(self) -> JudgeParams:
        if getattr(self, self.kind) is None:
            raise ValueError(f"kind is {self.kind!r} but the `{self.kind}` block is missing")
        return self


class BootstrapParams(Section):
    n_resamples: int = Field(ge=100, le=1_000_000, description="Bootstrap resamples per interval.")
    min_clusters: int = Field(default=10, ge=2, le=100_000, description="Fewest prompts an interval is computed "
                              "from; with fewer, no interval is reported (NaN) instead of a misleading one.")
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
