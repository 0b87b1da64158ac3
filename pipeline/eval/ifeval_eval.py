"""IFEval in the evaluate stage: reference accuracies, the validity rule, held-out instruction ids.

For each model, on IFEval-format prompts (`pipeline.constraints.ifeval`):
- the reference numbers, exactly as IFEval computes them (no validity rule on top, so they compare
  with published figures): prompt-level and instruction-level accuracy, strict and loose;
- the headline with the validity rule (`pipeline.eval.verifiable.score_set`): a degenerate answer
  (empty, cut, looping, copying the prompt, reused) fails every instruction of its prompt
  (`ifeval_prompt_strict_valid_*`);
- instruction-level strict and loose accuracy separately for the ids that never occur in the
  training prompts (`heldout`) and those that do (`indist`).
Prompt-level rates get a bootstrap interval over prompts; instruction-level (pooled) rates a cluster
bootstrap that resamples prompts, since the instructions of one prompt share one response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.eval.stats import mean_diff, mean_stat, paired_bootstrap_ci, ratio_of_sums

# The project's own constraint types and the IFEval ids they correspond to (for prompt files not yet
# written with IFEval ids); `starts_with` has no IFEval counterpart.
LEGACY_TO_IFEVAL = {
    "lowercase": "change_case:english_lowercase", "uppercase": "change_case:english_capital",
    "word_count": "length_constraints:number_words", "sentence_count": "length_constraints:number_sentences",
    "keywords": "keywords:existence", "forbidden_words": "keywords:forbidden_words",
    "ends_with": "startend:end_checker", "bullet_count": "detectable_format:number_bullet_lists",
    "json_format": "detectable_format:json_format", "no_commas": "punctuation:no_comma",
    "title": "detectable_format:title", "paragraphs": "length_constraints:number_paragraphs",
    "placeholders": "detectable_content:number_placeholders", "postscript": "detectable_content:postscript",
    "starts_with": "openrelease:starts_with",
}


def is_ifeval_file(path: Path) -> bool:
    """True when the first row of a JSONL file is in IFEval's own input format (`key`,
    `instruction_id_list`); the project's prompt files carry IFEval ids too but an `id`, not a `key`."""
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "key" in obj and "instruction_id_list" in obj
    return False


def training_ids(path: Path | None) -> set[str]:
    """The IFEval instruction ids the training prompts use (IFEval rows, or constraint types mapped)."""
    if path is None or not Path(path).is_file():
        return set()
    ids: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            ids.update(obj.get("instruction_id_list") or [])
            for c in obj.get("constraints") or []:
                t = c.get("type", "") if isinstance(c, dict) else ""
                ids.add(t if ":" in t else LEGACY_TO_IFEVAL.get(t, t))
    return ids


def _rate(prefix: str, ok: np.ndarray, n: np.ndarray, ci: dict, m: dict, min_clusters: int) -> None:
    """Pooled rate sum(ok)/sum(n) with a cluster (prompt) bootstrap interval."""
    keep = n > 0
    if not keep.any():  # no instruction in this group (no held-out id, say): nothing measured, nothing reported
        return
    est = float(ok[keep].sum() / n[keep].sum())
    if keep.sum() < min_clusters:
        lo = hi = float("nan")
    else:
        _, lo, hi = paired_bootstrap_ci((ok[keep], n[keep]), ratio_of_sums, **ci)
    m.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def _mean(prefix: str, arrays: tuple, stat, ci: dict, m: dict, min_clusters: int) -> None:
    est, lo, hi = paired_bootstrap_ci(arrays, stat, **ci)
    if len(arrays[0]) < min_clusters:
        lo = hi = float("nan")
    m.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def ifeval_metrics(scores: dict[str, Any], train_ids: set[str], ci: dict, min_clusters: int,
                   prefix: str = "ifeval_") -> dict[str, float]:
    """Metrics `<prefix>*` for each model's `SetScore` in `scores` ({"base": ..., "policy": ...}):
    IFEval's reference accuracies (strict from the scored verdicts, loose recomputed), held-out and
    in-distribution instruction ids apart, and the prompt-level strict pass with the validity rule."""
    from pipeline.constraints.ifeval import follow_list

    rows = next(iter(scores.values())).rows
    m: dict[str, float] = {f"n_{prefix}prompts": len(rows),
                           f"n_{prefix}instructions": sum(len(r["instruction_id_list"]) for r in rows)}
    held = [[i not in train_ids for i in r["instruction_id_list"]] for r in rows]
    m[f"n_{prefix}heldout_instructions"] = int(sum(map(sum, held)))
    m[f"n_{prefix}indist_instructions"] = m[f"n_{prefix}instructions"] - m[f"n_{prefix}heldout_instructions"]
    for name, score in scores.items():
        for mode in ("strict", "loose"):
            follow = score.follow if mode == "strict" else [
                follow_list(r["instruction_id_list"], r["kwargs"], r["prompt"], t, loose=True)
                for r, t in zip(rows, score.responses, strict=True)]
            allp = np.array([float(all(f)) for f in follow])
            n = np.array([len(f) for f in follow], dtype=float)
            ok = np.array([sum(f) for f in follow], dtype=float)
            _mean(f"{prefix}prompt_{mode}_{name}", (allp,), mean_stat, ci, m, min_clusters)
            _rate(f"{prefix}inst_{mode}_{name}", ok, n, ci, m, min_clusters)
            for group, want in (("heldout", True), ("indist", False)):
                g_ok = np.array([sum(x for x, h in zip(f, hs, strict=True) if h == want)
                                 for f, hs in zip(follow, held, strict=True)], dtype=float)
                g_n = np.array([sum(h == want for h in hs) for hs in held], dtype=float)
                _rate(f"{prefix}{group}_inst_{mode}_{name}", g_ok, g_n, ci, m, min_clusters)
        _mean(f"{prefix}prompt_strict_valid_{name}", (score.passed.astype(float),), mean_stat, ci, m, min_clusters)
    if {"base", "policy"} <= set(scores):
        _mean(f"{prefix}prompt_strict_valid_delta", (scores["policy"].passed.astype(float),
                                                     scores["base"].passed.astype(float)), mean_diff, ci, m, min_clusters)
    return m
