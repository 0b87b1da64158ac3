"""Sections of the data stages: data sources, validate, build."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.params.base import HF_DATASET, SHA256_HEX, Section


class DataSource(Section):
    """One preference-data source read by `ingest` (see pipeline/data/formats/ for the layouts)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="Short unique name; becomes the `source` of every row and pair from it.")
    format: Literal["ultrafeedback", "hh-rlhf", "pairs", "sharegpt", "rated"] = Field(
        description="Layout of the file: a key of pipeline.data.formats.READERS.")
    path: str = Field(min_length=1, description="Local file (.jsonl, .jsonl.gz, .json array or JSONL, .parquet), "
                      "the on-policy rows (`*rated`, the YAML alias of paths.rated), or a Hub pointer file "
                      "`<name>.hub.json` holding {dataset: <id>, revision: <40-hex commit>} (needs the network). "
                      "It is the DVC dependency of the source's ingest stage.")
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
                                                     "rating; null: the format's scale (see pipeline/data/formats).")

    @field_validator("path")
    @classmethod
    def _hub_path_pinned(cls, v: str) -> str:
        if v.startswith("hf://"):
            pinned = re.fullmatch(HF_DATASET, v)
            raise ValueError(
                "DVC cannot depend on an hf:// URL: write a pointer file such as data/sources/<name>.hub.json "
                '{"dataset": "<namespace>/<name>", "revision": "<40-hex commit>"} and use its path'
                + ("" if pinned else " (and pin a 40-hex commit)"))
        if "${" in v:
            raise ValueError("DVC does not interpolate ${...} inside params values, so it could not track this "
                             "file: write the path itself, or the YAML alias `*rated` for paths.rated")
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
                                          "paths.test_prompts is always added.")

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
    no_control_chars: RuleAction = Field(
        default="quarantine", description="No prompt or completion text holds a control character (NUL and the "
        "other C0/C1 codes) other than tab, newline, and carriage return as part of CRLF.")


class PairRules(Section):
    """What to do when a built pair breaks a rule (checked by `build` before writing the dataset)."""

    required_columns: RuleAction = Field(description="Every contract column is present and not null.")
    text_not_blank: RuleAction = Field(description="Prompt, chosen and rejected have non-blank text.")
    chosen_differs: RuleAction = Field(description="Chosen and rejected texts differ.")
    token_length: Literal["fail", "quarantine", "truncate"] = Field(
        description="prompt+chosen and prompt+rejected, after the chat template, fit in validate.max_length tokens. "
        "truncate keeps a longer pair for TRL to truncate as train.dpo.truncation_mode says (keep_start: the "
        "completion's end is cut), flagged per pair in provenance and counted in metrics/data.json.")
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

    binarize: Literal["best_vs_worst", "best_vs_worst_length_matched", "best_vs_random", "all_pairs_above_margin"] = Field(
        description="best_vs_worst: highest vs lowest score; best_vs_worst_length_matched: the same, the rejected one "
                    "the lowest-scored completion closest in length to the chosen; best_vs_random: highest vs a "
                    "seeded random lower one (Zephyr); all_pairs_above_margin: every pair whose scores differ by >= min_margin.")
    min_margin: float = Field(ge=0, description="Smallest score difference kept; equal scores (ties) are always "
                              "dropped. Scores are the mean of a completion's available ratings.")
    seed: int = Field(ge=0, description="Seed of best_vs_random, source weights and the train/test split.")
    test_fraction: float = Field(ge=0, lt=1, description="Share of the prompts that make a pair held out in test.parquet: "
                                 "exactly round(fraction x paired prompts), those with the lowest hash of (seed, prompt hash).")
    test_binarize: Literal["best_vs_worst", "best_vs_worst_length_matched", "best_vs_random",
                           "all_pairs_above_margin"] | None = Field(
        default=None, description="Binarization of the test split's prompts (null: as `binarize`). "
        "all_pairs_above_margin measures preference accuracy on every ranking the ratings make, several "
        "pairs per prompt; evaluate's interval resamples prompts, so their correlation is accounted for.")
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
