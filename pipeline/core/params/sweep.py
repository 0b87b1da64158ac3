"""The sweep section: a grid over params keys, training seeds, and the selection rule fixed in advance.

The rule's grammar is deliberately tiny, so it can be checked here, applied mechanically by
`openrelease sweep` and re-applied by `openrelease audit` (pipeline/core/selection.py):

    metric:      a metrics/eval.json key measured on the dev prompts, e.g. dev_pass_rate_delta
    goal:        maximise | minimise
    constraints: "<metric> <op> <number>", op one of >= <= > <, e.g. "length_ratio <= 2.0", "kl <= 0.5"
    tie_break:   "<metric> min|max" entries, applied in order when configurations tie on `metric`

Three prompt roles, never mixed (shared/DESIGN.md): dev prompts choose, test prompts are reported. So the
rule may read only dev metrics (`dev_*`) and the drift guards measured over every evaluation response
(DRIFT_GUARDS: how far a configuration moved from the base, not how well it scores on test), and the
card's `headline` reports test metrics only. A test metric may be reported, never selected on.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.params.base import Section

METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
TIE_BREAK = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+(min|max)\s*$")
DEV_PREFIX = "dev_"  # the evaluate stage's metrics on the dev prompt set (paths.dev_prompts)
# Length and KL of the policy against the base over every evaluation response: they bound drift, they
# do not score the test prompts, so a constraint or tie-break on them does not select on test.
DRIFT_GUARDS = frozenset({"length_ratio", "kl", "kl_per_token"})


def selection_metric_problem(name: str, role: str) -> str | None:
    """Why `name` may not be used by the rule as `role` (objective, constraint, tie-break); None: allowed."""
    if name.startswith(DEV_PREFIX):
        return None
    if role != "objective" and name in DRIFT_GUARDS:
        return None
    allowed = "a dev_* metric" + ("" if role == "objective" else f" or a drift guard ({', '.join(sorted(DRIFT_GUARDS))})")
    return (f"{name!r} is measured on the test prompts; the rule's {role} must be {allowed}, "
            f"because dev prompts choose and test prompts are only reported (select on {DEV_PREFIX}{name})")


def parse_constraint(text: str) -> tuple[str, str, float]:
    m = CONSTRAINT.match(text)
    if not m:
        raise ValueError(f"{text!r} is not '<metric> <op> <number>' with op one of >= <= > <")
    return m.group(1), m.group(2), float(m.group(3))


def parse_tie_break(text: str) -> tuple[str, str]:
    m = TIE_BREAK.match(text)
    if not m:
        raise ValueError(f"{text!r} is not '<metric> min' or '<metric> max'")
    return m.group(1), m.group(2)


class SelectionRule(Section):
    """How the released configuration is picked from the sweep table, before any member has run."""

    metric: str = Field(description=(
        "The metrics/eval.json key whose mean over seeds is optimised: a dev-set metric (dev_*), never a "
        "test-set one (the card reports the pick's test metrics)."))
    goal: Literal["maximise", "minimise"] = Field(description="Whether a larger or a smaller `metric` is better.")
    constraints: list[str] = Field(default_factory=list, description=(
        "Conditions on a configuration's mean over seeds, '<metric> <op> <number>' (op: >= <= > <); "
        "configurations that break one are not eligible."))
    tie_break: list[str] = Field(default_factory=list, description=(
        "'<metric> min|max' entries applied in order when configurations tie on `metric`; the first "
        "configuration in grid order wins any remaining tie."))
    null_value: float = Field(description=(
        "The value of `metric` that means 'no better than the base model' (0 for a difference such as "
        "dev_pass_rate_delta, 0.5 for a win rate): the winner-vs-base test and its Holm adjustment use it."))
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Family-wise error rate of the Holm-adjusted test.")

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, v: str) -> str:
        if not METRIC_NAME.match(v):
            raise ValueError(f"{v!r} is not a metric name (letters, digits, underscores)")
        if problem := selection_metric_problem(v, "objective"):
            raise ValueError(problem)
        return v

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, v: list[str]) -> list[str]:
        for text in v:
            if problem := selection_metric_problem(parse_constraint(text)[0], "constraint"):
                raise ValueError(f"{text!r}: {problem}")
        return v

    @field_validator("tie_break")
    @classmethod
    def _tie_break(cls, v: list[str]) -> list[str]:
        for text in v:
            if problem := selection_metric_problem(parse_tie_break(text)[0], "tie-break"):
                raise ValueError(f"{text!r}: {problem}")
        return v


class SweepParams(Section):
    """A grid of training configurations, each trained with every seed (`openrelease sweep`)."""

    axes: dict[str, list[Any]] = Field(description=(
        "params keys (dotted, e.g. train.dpo.beta) -> the values to try; the grid is their product. Each key "
        "must exist in params.yaml and each value must pass that section's validation."))
    seed_key: str = Field(description="The params key of the training seed (train.dpo.seed: TRL's seed).")
    seeds: list[int] = Field(min_length=1, description="Training seeds; every configuration is trained with each.")
    selection: SelectionRule
    headline: list[str] = Field(min_length=1, description=(
        "metrics/eval.json test-set keys plotted against each axis and reported for the pick on the card, "
        "mean over seeds with the seed std (dev metrics chose it, so they are not reported as results)."))
    jobs: int = Field(ge=1, le=256, description="Members run at once (`dvc queue start -j`).")

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("at least one axis is needed (a key with a list of values)")
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: an axis needs at least one value")
            if len({repr(x) for x in values}) != len(values):
                raise ValueError(f"{key} = {values!r}: values repeat")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v!r}: seeds repeat")
        return v

    @field_validator("headline")
    @classmethod
    def _headline(cls, v: list[str]) -> list[str]:
        for name in v:
            if not METRIC_NAME.match(name):
                raise ValueError(f"{name!r} is not a metric name")
            if name.startswith(DEV_PREFIX):
                raise ValueError(f"{name!r} is a dev-set metric: the headline reports test metrics (dev prompts "
                                 "chose the configuration, so their numbers are biased upwards)")
        return v

    @model_validator(mode="after")
    def _seed_not_axis(self) -> SweepParams:
        if self.seed_key in self.axes:
            raise ValueError(f"{self.seed_key} is the seed key; list seeds under `seeds`, not as an axis")
        return self


_MISSING = object()


def _get(raw: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return _MISSING
        raw = raw[part]
    return raw


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        raw = raw[part]
    raw[parts[-1]] = value


def check_sweep_keys(raw: dict[str, Any], validate: Any) -> None:
    """Every axis key and the seed key exist in the params (`raw`, without the sweep section), and every
    value passes validation: `validate(raw_with_value)` raises on a bad one. Raises ValueError naming
    the key and value."""
    import copy

    sweep = raw["sweep"]
    rest = {k: v for k, v in raw.items() if k != "sweep"}
    for key, values in [*sweep["axes"].items(), (sweep["seed_key"], sweep["seeds"])]:
        where = "sweep.seeds" if key == sweep["seed_key"] and values is sweep["seeds"] else f"sweep.axes.{key}"
        if _get(rest, key) is _MISSING:
            raise ValueError(f"{where}: {key} is not a key of params.yaml")
        if key.split(".")[0] == "paths":
            raise ValueError(f"{where}: paths are not a hyperparameter; they cannot be swept")
        for value in values:
            trial = copy.deepcopy(rest)
            _set(trial, key, value)
            try:
                validate(trial)
            except Exception as e:  # noqa: BLE001 (the validator's own message is what the user needs)
                raise ValueError(f"{where}: {key} = {value!r} is not valid there: {e}") from None
