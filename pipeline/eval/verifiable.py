"""Verifiable instruction following on one prompt set, with the validity rule: the headline's code.

`score_set` is the one function that scores answers to prompts carrying IFEval instruction ids. It
scores evaluate's test and dev sets and the IFEval subset for both models, every member of the
trivial-answer panel, and the file `openrelease score` reads, so a pass rate means the same thing
wherever it is printed.

Prompt-level pass = the answer is valid and IFEval's strict checker passes every instruction;
constraint-level = pooled share of instructions followed by valid answers. The validity rule
(`pipeline.constraints.validity`): an empty, too short, looping, prompt-copying, reused or cut answer
is a failed answer and meets none of its instructions, so a model cannot score by saying less, by
saying the same thing everywhere, or by echoing the request. Deltas (policy - base) get a paired
bootstrap interval over prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.constraints.validity import RULES, Rules, Verdict, assess, required_texts
from pipeline.eval.stats import mean_diff, mean_stat, paired_bootstrap_ci, pooled_rate_diff


def _ci(prefix: str, est_lo_hi: tuple[float, float, float], metrics: dict[str, float]) -> None:
    est, lo, hi = est_lo_hi
    metrics.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def read_prompt_set(path: Path, limit: int | None = None) -> list[dict]:
    """Rows {prompt, instruction_id_list, kwargs, id or key} of a prompt file in the project's format
    (`pipeline.constraints.prompts`) or IFEval's input format."""
    from pipeline.constraints.ifeval import read_ifeval
    from pipeline.constraints.prompts import read_prompts
    from pipeline.eval.ifeval_eval import is_ifeval_file

    return (read_ifeval(path) if is_ifeval_file(path) else read_prompts(path))[:limit]


def row_id(row: dict) -> str:
    return str(row.get("id", row.get("key")))


@dataclass
class SetScore:
    """One model's answers to one prompt set, measured and checked."""

    rows: list[dict]
    responses: list[str]
    finished: list[bool | None]
    verdicts: list[Verdict]
    follow: list[list[bool]]  # IFEval strict per instruction, reference semantics (no validity rule)

    @property
    def valid(self) -> np.ndarray:
        return np.array([v.valid for v in self.verdicts], dtype=bool)

    @property
    def strict(self) -> np.ndarray:
        """Prompt-level strict pass as IFEval's reference scores it (validity ignored)."""
        return np.array([all(f) for f in self.follow], dtype=bool)

    @property
    def passed(self) -> np.ndarray:
        """The headline: prompt-level strict pass of a valid answer."""
        return self.strict & self.valid

    @property
    def n(self) -> np.ndarray:
        return np.array([len(f) for f in self.follow], dtype=float)

    @property
    def ok(self) -> np.ndarray:
        return np.array([sum(f) for f in self.follow], dtype=float) * self.valid

    def rule_failures(self) -> dict[str, int]:
        return {r: sum(r in v.failed for v in self.verdicts) for r in RULES}


def score_set(rows: Sequence[dict], responses: Sequence[str], finished: Sequence[bool | None] | None,
              rules: Rules) -> SetScore:
    """Score `responses[i]` as the answer to `rows[i]` ({prompt, instruction_id_list, kwargs}).

    `finished[i]`: whether the generator ended the answer itself (None: unknown; the validity rule
    then judges a cut by the text). Reuse is counted within this set.
    """
    from pipeline.constraints.ifeval import follow_list

    rows, responses = list(rows), list(responses)
    finished = list(finished) if finished is not None else [None] * len(rows)
    verdicts = assess([r["prompt"] for r in rows], responses, finished, rules, [row_id(r) for r in rows],
                      [required_texts(r["instruction_id_list"], r["kwargs"]) for r in rows])
    follow = [follow_list(r["instruction_id_list"], r["kwargs"], r["prompt"], t) for r, t in zip(rows, responses, strict=True)]
    return SetScore(rows, responses, finished, verdicts, follow)


def headline_metrics(prefix: str, scores: dict[str, SetScore], ci: dict, min_clusters: int) -> dict[str, float]:
    """`{prefix}pass_rate_{base,policy,delta}` and `{prefix}constraint_pass_rate_*`, with intervals, and
    `{prefix}n_constraints`. No interval (NaN) from fewer than `min_clusters` prompts."""
    base, pol = scores["base"], scores["policy"]
    few = len(base.rows) < min_clusters
    m: dict[str, float] = {f"{prefix}n_constraints": int(base.n.sum())}
    pb, pp = base.passed.astype(float), pol.passed.astype(float)
    for key, data, stat in ((f"{prefix}pass_rate_base", (pb,), mean_stat), (f"{prefix}pass_rate_policy", (pp,), mean_stat),
                            (f"{prefix}pass_rate_delta", (pp, pb), mean_diff)):
        est, lo, hi = paired_bootstrap_ci(data, stat, **ci)
        _ci(key, (est, float("nan"), float("nan")) if few else (est, lo, hi), m)
    total = base.n.sum()
    m[f"{prefix}constraint_pass_rate_base"] = float(base.ok.sum() / total) if total else float("nan")
    m[f"{prefix}constraint_pass_rate_policy"] = float(pol.ok.sum() / total) if total else float("nan")
    est, lo, hi = paired_bootstrap_ci((pol.ok, base.ok, base.n), pooled_rate_diff, **ci)
    _ci(f"{prefix}constraint_pass_rate_delta", (est, float("nan"), float("nan")) if few else (est, lo, hi), m)
    return m


def degeneration_metrics(prefix: str, verdicts: dict[str, Sequence[Verdict]], ci: dict,
                         min_clusters: int, per_rule: bool = False) -> dict[str, float]:
    """`{prefix}degenerate_rate_{base,policy,delta}` with intervals over responses (paired: the same
    prompts), and with `per_rule` each rule's `{prefix}{rule}_rate_{base,policy,delta}` with its interval
    and the mean n-gram repetition and prompt copy."""
    m: dict[str, float] = {}
    few = len(verdicts["base"]) < min_clusters
    deg = {who: np.array([not v.valid for v in vs], dtype=float) for who, vs in verdicts.items()}
    series = [(f"{prefix}degenerate_rate_{who}", (deg[who],), mean_stat) for who in ("base", "policy")]
    series.append((f"{prefix}degenerate_rate_delta", (deg["policy"], deg["base"]), mean_diff))
    if per_rule:
        for rule in RULES:
            flags = {who: np.array([rule in v.failed for v in verdicts[who]], dtype=float) for who in ("base", "policy")}
            for who in ("base", "policy"):
                series.append((f"{prefix}{rule}_rate_{who}", (flags[who],), mean_stat))
            series.append((f"{prefix}{rule}_rate_delta", (flags["policy"], flags["base"]), mean_diff))
    for key, data, stat in series:
        if len(data[0]) == 0:
            continue
        est, lo, hi = paired_bootstrap_ci(data, stat, **ci)
        _ci(key, (est, float("nan"), float("nan")) if few else (est, lo, hi), m)
    if per_rule:
        for who in ("base", "policy"):
            m[f"{prefix}repetition_mean_{who}"] = float(np.mean([v.repetition for v in verdicts[who]]))
            m[f"{prefix}prompt_copy_mean_{who}"] = float(np.mean([v.prompt_copy for v in verdicts[who]]))
    return m


def verdict_columns(who: str, verdicts: Sequence[Verdict]) -> dict[str, list]:
    """Per-response measure columns for a table, suffixed by model."""
    rows = [v.as_row() for v in verdicts]
    keys = ("finished", "valid", "failed", "words", "repetition", "whole_repeats", "repeated_sentence",
            "prompt_copy", "prompt_words", "topic_words", "reused", "ends_finished")
    return {f"{k}_{who}": [r[k] for r in rows] for k in keys}


def set_table(scores: dict[str, SetScore]) -> Any:
    """One row per prompt: the prompt, its instructions, and per model the answer, its measures,
    the reference verdicts and the headline pass."""
    import pandas as pd

    first = next(iter(scores.values()))
    table: dict[str, list] = {"id": [row_id(r) for r in first.rows], "prompt": [r["prompt"] for r in first.rows],
                              "instruction_id_list": [json.dumps(r["instruction_id_list"]) for r in first.rows],
                              "kwargs": [json.dumps(r["kwargs"]) for r in first.rows]}
    for who, s in scores.items():
        table[f"response_{who}"] = s.responses
        table.update(verdict_columns(who, s.verdicts))
        table[f"follow_strict_{who}"] = [json.dumps(f) for f in s.follow]
        table[f"strict_{who}"] = s.strict.tolist()
        table[f"pass_{who}"] = s.passed.tolist()
    return pd.DataFrame(table)
