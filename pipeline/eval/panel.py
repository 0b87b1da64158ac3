"""The trivial-answer panel: the cheapest ways to game the headline, scored by the headline's code.

Every evaluation answers the test prompts with answers that need no model, plus two made from the
base model's own answers, and scores each with `pipeline.eval.verifiable.score_set`, exactly as the
headline is scored. `pass_rate_floor` is the best member's pass rate: a model whose headline does not
beat it has learned nothing a constant could not do, and the release gate refuses it.

Members (none has a `finished` flag, so the validity rule judges a cut by the text, as it does for
`openrelease score`):
- `empty`: ""; `one_word`: "ok";
- `echo`, `echo_lower`, `echo_upper`: the prompt itself, as is, lowercased and uppercased;
- `fixed`: one sentence for every prompt, lowercase with no comma (it meets lowercase, no-comma and
  word-limit instructions by construction);
- `base_repeated`: the base model's answer said twice;
- `base_cut`: the base model's answer cut mid-sentence, after about half its words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from pipeline.constraints.validity import Rules
from pipeline.eval.verifiable import row_id, score_set

FIXED_ANSWER = "i cannot help with that."
ONE_WORD = "ok"
MEMBERS = ("empty", "one_word", "echo", "echo_lower", "echo_upper", "fixed", "base_repeated", "base_cut")
_TOKEN = re.compile(r"\S+")


def cut_mid_sentence(text: str) -> str:
    """The text up to about half its words, ending on a word that does not end a sentence (the nearest
    such word at or after the middle, else before it)."""
    tokens = list(_TOKEN.finditer(text))
    if len(tokens) < 2:
        return ""
    half = math.ceil(len(tokens) / 2) - 1
    order = list(range(half, len(tokens) - 1)) + list(range(half - 1, -1, -1))
    for i in order:
        if tokens[i].group()[-1].isalnum():  # a word that ends no sentence (not a bullet marker or "dry.")
            return text[: tokens[i].end()]
    return text[: tokens[half].end()]


def members(rows: Sequence[dict], base_responses: Sequence[str]) -> dict[str, list[str]]:
    prompts = [r["prompt"] for r in rows]
    return {
        "empty": [""] * len(rows),
        "one_word": [ONE_WORD] * len(rows),
        "echo": list(prompts),
        "echo_lower": [p.lower() for p in prompts],
        "echo_upper": [p.upper() for p in prompts],
        "fixed": [FIXED_ANSWER] * len(rows),
        "base_repeated": [f"{r}\n\n{r}" if r.strip() else r for r in base_responses],
        "base_cut": [cut_mid_sentence(r) for r in base_responses],
    }


def run_panel(rows: Sequence[dict], base_responses: Sequence[str], rules: Rules) -> tuple[dict[str, float], Any]:
    """`panel_<member>_pass_rate` for each member and `pass_rate_floor` (the best of them), and a
    table with every member's answer, validity, broken rules and pass per prompt."""
    import pandas as pd

    metrics: dict[str, float] = {}
    frames = []
    for name, answers in members(rows, base_responses).items():
        s = score_set(rows, answers, None, rules)
        metrics[f"panel_{name}_pass_rate"] = float(s.passed.mean()) if len(rows) else float("nan")
        frames.append(pd.DataFrame({"member": name, "id": [row_id(r) for r in rows], "response": answers,
                                    "valid": s.valid, "failed": [",".join(v.failed) for v in s.verdicts],
                                    "strict": s.strict, "pass": s.passed}))
    metrics["pass_rate_floor"] = max(metrics[f"panel_{n}_pass_rate"] for n in MEMBERS)
    return metrics, pd.concat(frames, ignore_index=True)


def floor_member(metrics: dict[str, Any]) -> str | None:
    """The member whose pass rate is the floor (first in MEMBERS order on a tie)."""
    rates = {n: metrics.get(f"panel_{n}_pass_rate") for n in MEMBERS}
    rates = {n: r for n, r in rates.items() if isinstance(r, int | float) and not math.isnan(r)}
    return max(rates, key=lambda n: (rates[n], -MEMBERS.index(n))) if rates else None
