"""The rounds section: iterative on-policy DPO, round k sampling its data with round k-1's policy.

Round 1 is the pipeline's ordinary stages (generate ... evaluate) and their paths. Each later round is
one entry of `later`, which dvc.yaml's `foreach` blocks turn into the stages `<stage>_round@<name>`. DVC
templating cannot count, so `later` spells out the folders each round reads from the round before;
this section checks they are exactly what the layout (pipeline/core/rounds.py) says, so a typo stops
the stage with the entry to write instead of silently chaining the wrong folders.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.params.base import Section
from pipeline.core.params.sweep import SelectionRule

ROUND_NAME = re.compile(r"^r([1-9][0-9]*)$")


class LaterRound(Section):
    """One round after the first: what it reads from the round before it (paths, for DVC's deps)."""

    model_in: str = Field(description="The previous round's merged model folder: this round samples with it "
                          "(and trains from it when rounds.start_from is `previous`).")
    dataset_in: str = Field(description="The previous round's dataset folder (rounds.data accumulate adds to it).")
    eval_in: str = Field(description="The previous round's per-prompt evaluation folder (this round is compared "
                         "with it prompt by prompt).")
    summary_in: str = Field(description="The previous round's summary: round 1's evaluation metrics file for r2, "
                            "else the previous round's rounds summary.")
    prompts: str = Field(description="The prompts this round samples (paths.train_prompts in the block `openrelease "
                         "rounds` prints): train-role prompts, checked disjoint from dev and test by build.")


class RoundsParams(Section):
    """`rounds`: how many DPO rounds, what each starts from, which data it trains on, what is released."""

    count: int = Field(default=1, ge=1, le=20, description="Rounds in all; 1 is the single offline pass.")
    start_from: Literal["previous", "base"] = Field(default="previous", description=(
        "previous: round k trains round k-1's merged policy, which is also its DPO reference; base: every "
        "round trains the base model (needs data: accumulate, so the last round sees all data so far)."))
    data: Literal["replace", "accumulate"] = Field(default="replace", description=(
        "replace: round k trains on the pairs from its own samples; accumulate: on every round's train pairs so far."))
    dir: str = Field(default="outputs/rounds", description="Folder of the later rounds' outputs, one sub-folder per round.")
    publish: str = Field(default="last", description=(
        "Which round the release ships: `last`, `rule` (rounds.selection applied to the dev metrics of every "
        "round), or a round name (r1, r2, ...)."))
    selection: SelectionRule | None = Field(default=None, description="The rule `publish: rule` applies, on dev metrics.")
    later: dict[str, LaterRound] = Field(default_factory=dict, description=(
        "The rounds after the first, named r2, r3, ... in order; count must be 1 + their number."))

    @model_validator(mode="after")
    def _consistent(self) -> RoundsParams:
        names = list(self.later)
        want = [f"r{k}" for k in range(2, self.count + 1)]
        if names != want:
            raise ValueError(f"rounds.count = {self.count} needs rounds.later to name exactly {want or 'no round'} "
                             f"in order, got {names} (`openrelease rounds --count {self.count}` prints the block)")
        if self.start_from == "base" and self.data != "accumulate" and self.count > 1:
            raise ValueError("rounds.start_from = 'base' trains the base model on all data so far: it needs "
                             "rounds.data = 'accumulate'")
        if self.publish not in ("last", "rule") and not (ROUND_NAME.match(self.publish)
                                                          and int(self.publish[1:]) <= self.count):
            raise ValueError(f"rounds.publish = {self.publish!r}: use last, rule, or a round name r1..r{self.count}")
        if self.publish == "rule" and self.selection is None:
            raise ValueError("rounds.publish = 'rule' needs rounds.selection")
        return self
