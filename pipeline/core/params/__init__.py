"""Typed parameters: params.yaml parsed once into pydantic models.

Every section forbids unknown keys, so a typo stops the stage with exit code 2 and one line naming
the key path, the bad value and what is allowed. Paths are declared once, in the `paths` section,
and reach dvc.yaml through `${paths.*}` templating.

Each stage's section is owned by that stage's module in `pipeline/stages/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import ParamsError
from pipeline.core.params.base import GIT_COMMIT, HF_DATASET, SHA256_HEX, Section  # noqa: F401 (re-exported)
from pipeline.core.params.common import Paths, Tracking  # noqa: F401 (re-exported)
from pipeline.core.params.data import (  # noqa: F401 (re-exported)
    BuildParams,
    DataParams,
    DataSource,
    EvalPromptSet,
    PairRules,
    RowRules,
    ValidateParams,
)
from pipeline.core.params.eval import (  # noqa: F401 (re-exported)
    BootstrapParams,
    EvalGenerationParams,
    EvaluateParams,
    GeneralPromptsParams,
    JudgeParams,
    LocalJudgeParams,
    OpenAIJudgeParams,
)
from pipeline.core.params.release import HUB_REPO_ID, CardParams, LicenseOverride, MetricBound, PublishParams  # noqa: F401 (re-exported)
from pipeline.core.params.rounds import LaterRound, RoundsParams  # noqa: F401 (re-exported)
from pipeline.core.params.sources import BaseModelParams, GenerateParams, HubSource, RateParams, WheelSource  # noqa: F401 (re-exported)
from pipeline.core.params.sweep import SelectionRule, SweepParams, check_sweep_keys  # noqa: F401 (re-exported)
from pipeline.core.params.train import LauncherParams, LoraParams, TrainParams  # noqa: F401 (re-exported)
from pipeline.core.params.validity import ValidityParams  # noqa: F401 (re-exported)


class Params(Section):
    """The whole params.yaml."""

    paths: Paths
    tracking: Tracking
    base_model: BaseModelParams
    generate: GenerateParams
    rate: RateParams
    validity: ValidityParams
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    build: BuildParams
    train: TrainParams
    evaluate: EvaluateParams
    card: CardParams
    publish: PublishParams
    sweep: SweepParams | None = Field(default=None, description="`openrelease sweep`: null when no sweep is configured.")
    rounds: RoundsParams = Field(default_factory=RoundsParams, description="Iterative DPO rounds (count 1: one pass).")

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

    @model_validator(mode="after")
    def _rounds_chain(self) -> Params:
        # DVC reads each later round's input folders from params; they must be the ones the layout gives
        from pipeline.core.rounds import later_problems

        if problems := later_problems(self):
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Params:
        if self.sweep is not None:
            def validate(raw: dict[str, Any]) -> None:
                try:
                    Params.model_validate(raw)
                except ValidationError as e:
                    raise ValueError(format_validation_error("", e, raw).removeprefix(": ")) from None

            check_sweep_keys(self.model_dump(mode="json", by_alias=True), validate)
        return self

    def section(self, dotted: str) -> Any:
        """The params value at a dotted key path such as `paths.model` or `train`."""
        obj: Any = self
        for part in dotted.split("."):
            # a mapping of sections (rounds.later.r2): its key
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, "validate_" if part == "validate" else part)
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
