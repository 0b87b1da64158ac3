"""The model card's evaluation notes: IFEval subset, validity rule, judge reliability and agreement.

Every number comes from `metrics/eval.json`, the evaluate stage's lineage record (`extra`) or the
judge-agreement report; a missing one is printed as missing.
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "*missing*"

# The base model's own published IFEval figure, read from the SmolLM2-135M-Instruct model card's
# README.md (section "Evaluation", table "Instruction model"; a stored copy of the card, since the
# Hub is not reachable from this project's machines). The card says every evaluation is zero-shot
# and run with lighteval.
SMOLLM2_135M_IFEVAL = {"value": 29.9, "metric": "IFEval (Average prompt/inst)",
                       "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (README.md, "
                                 "Evaluation > Instruction model; SmolLM-135M-Instruct: 17.2)",
                       "harness": "lighteval, zero-shot"}


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return MISSING if v is None else "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (lo, hi)):
        return "none (too few prompts, or no variability to bound)" if key in m else ""
    return f"[{lo:.3f}, {hi:.3f}]"


def _row(m: dict, label: str, key: str) -> str:
    return f"| {label} | {_f(m.get(key + '_base'))} {_ci(m, key + '_base')} | " \
           f"{_f(m.get(key + '_policy'))} {_ci(m, key + '_policy')} |"


def ifeval_section(m: dict, rec: dict) -> str:
    if "n_ifeval_prompts" not in m:
        return "IFEval subset: not evaluated (`paths.ifeval_prompts` is null)."
    sub = (rec.get("extra") or {}).get("ifeval_subset") or {}
    src = sub.get("source") or {}
    gen = (rec.get("extra") or {}).get("generation") or {}
    lines = [
        "### IFEval subset",
        "",
        f"- subset: {sub.get('size', m['n_ifeval_prompts'])} of {sub.get('source_rows', MISSING)} IFEval prompts "
        f"(`{sub.get('path', MISSING)}`), seed {sub.get('seed', MISSING)}, rule: {sub.get('rule', MISSING)}; "
        f"source {src.get('repository', MISSING)} @ {src.get('commit', MISSING)} : {src.get('path', MISSING)} "
        f"({src.get('license', MISSING)}); published as config `ifeval_prompts` of the dataset repo",
        f"- generation: greedy (do_sample={gen.get('do_sample', MISSING)}), max_new_tokens "
        f"{gen.get('max_new_tokens', MISSING)}, weights in {gen.get('precision', 'float32')}, the model's chat template, "
        "one user turn, no system prompt",
        f"- {m.get('n_ifeval_instructions')} instructions: {m.get('n_ifeval_heldout_instructions')} with ids never "
        f"used in the training prompts (held-out), {m.get('n_ifeval_indist_instructions')} with ids training used",
        "",
        "IFEval's reference semantics (comparable with published numbers; an unfinished answer is scored as it is):",
        "",
        "| metric | base | this model |", "|---|---|---|",
        _row(m, "prompt-level strict", "ifeval_prompt_strict"),
        _row(m, "prompt-level loose", "ifeval_prompt_loose"),
        _row(m, "instruction-level strict", "ifeval_inst_strict"),
        _row(m, "instruction-level loose", "ifeval_inst_loose"),
        _row(m, "held-out ids, instruction-level strict", "ifeval_heldout_inst_strict"),
        _row(m, "held-out ids, instruction-level loose", "ifeval_heldout_inst_loose"),
        _row(m, "in-distribution ids, instruction-level strict", "ifeval_indist_inst_strict"),
        _row(m, "in-distribution ids, instruction-level loose", "ifeval_indist_inst_loose"),
        "",
        "With the validity rule (an empty or unfinished answer fails its prompt):",
        "",
        "| metric | base | this model |", "|---|---|---|",
        _row(m, "prompt-level strict, valid answers only", "ifeval_prompt_strict_valid"),
        "",
        f"For comparison, the base model's card reports {SMOLLM2_135M_IFEVAL['metric']} = "
        f"{SMOLLM2_135M_IFEVAL['value']} (source: {SMOLLM2_135M_IFEVAL['source']}; {SMOLLM2_135M_IFEVAL['harness']}). "
        "How the settings differ: that figure is over IFEval's 541 prompts, with lighteval's generation settings "
        "(the card does not list them) on the original bfloat16 weights; ours is the seeded subset above, "
        "greedy with the token budget above (unfinished answers are scored as they are in the reference numbers), "
        "on weights dequantized from Q4_1. We do not know whether the card averages strict or loose accuracy; the "
        f"mean of our base model's prompt- and instruction-level accuracy is {_f(_avg(m, 'base', 'strict'))} strict, "
        f"{_f(_avg(m, 'base', 'loose'))} loose (x100 to compare).",
    ]
    return "\n".join(lines)


def _avg(m: dict, who: str, mode: str) -> float | None:
    a, b = m.get(f"ifeval_prompt_{mode}_{who}"), m.get(f"ifeval_inst_{mode}_{who}")
    return (a + b) / 2 if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def eval_ids_section(m: dict) -> str:
    """The project's held-out constraint prompts split by instruction id group (they use IFEval ids)."""
    if "n_eval_ifeval_prompts" not in m:
        return ""
    return "\n".join([
        "### Held-out constraint prompts by instruction id",
        "",
        f"{m.get('n_eval_ifeval_instructions')} instructions in `paths.eval_prompts`: "
        f"{m.get('n_eval_ifeval_heldout_instructions')} with ids the training prompts never use, "
        f"{m.get('n_eval_ifeval_indist_instructions')} with ids they use (IFEval's strict and loose rules).",
        "",
        "| metric | base | this model |", "|---|---|---|",
        _row(m, "held-out ids, instruction-level strict", "eval_ifeval_heldout_inst_strict"),
        _row(m, "held-out ids, instruction-level loose", "eval_ifeval_heldout_inst_loose"),
        _row(m, "in-distribution ids, instruction-level strict", "eval_ifeval_indist_inst_strict"),
        _row(m, "in-distribution ids, instruction-level loose", "eval_ifeval_indist_inst_loose"),
        _row(m, "prompt-level strict with the validity rule (= pass_rate)", "eval_ifeval_prompt_strict_valid"),
    ])


def validity_section(m: dict) -> str:
    return "\n".join([
        "### Validity rule and what would game the metrics",
        "",
        "The headline pass rates (`pass_rate_base`, `pass_rate_policy`) count an empty response, or one cut at "
        "`max_new_tokens` before it ended, as a failed answer: it meets none of its prompt's constraints. So a model "
        "that says nothing scores 0 and cannot show a gain.",
        "",
        "| share of responses | base | this model |", "|---|---|---|",
        f"| empty | {_f(m.get('empty_rate_base'))} | {_f(m.get('empty_rate_policy'))} |",
        f"| unfinished (cut at max_new_tokens) | {_f(m.get('unfinished_rate_base'))} | "
        f"{_f(m.get('unfinished_rate_policy'))} |",
        "",
        f"Length ratio (this model / base, tokens): {_f(m.get('length_ratio'))}; release gates bound it from both "
        "sides (`publish.thresholds.length_ratio`).",
        "",
        f"Held-out preference accuracy: {_f(m.get('pref_n'))} test pairs from {_f(m.get('pref_n_prompts'))} prompts; "
        "its interval resamples prompts (a cluster bootstrap), and none is given from fewer than "
        "`evaluate.bootstrap.min_clusters` prompts.",
    ])


def judge_section(m: dict, agreement: dict | None, labels: str | None) -> str:
    lines = ["### Judge", ""]
    if "judge_order_consistency" not in m:
        return "\n".join([*lines, f"Judge: {MISSING}"])
    if "judge_reliable" not in m:
        lines.append(f"Order consistency {_f(m.get('judge_order_consistency'))}; this evaluation did not rate the "
                     "judge's reliability (no `judge_reliable` in its results).")
    elif m.get("judge_reliable") == 0:
        lines.append(f"**The judge is unreliable**: it named the same winner in both presentation orders for "
                     f"{_f(m.get('judge_order_consistency'))} of the pairs, below the threshold "
                     f"{_f(m.get('judge_min_order_consistency'))} (`evaluate.judge.min_order_consistency`); it mostly "
                     "picks by position. Its win rates are listed above for completeness only: they are not in the "
                     "model-index and no release gate uses them.")
    else:
        lines.append(f"Order consistency {_f(m.get('judge_order_consistency'))} (threshold "
                     f"{_f(m.get('judge_min_order_consistency'))}): the judge's win rates are reported and gated.")
    lines += ["", "Length-controlled win rate (`lc_win_rate`): AlpacaEval 2's GLM, logit P(this model preferred) = "
              "theta + phi * tanh(delta_len / sd(delta_len)) (+ psi * instruction difficulty when several models are "
              "judged on the same prompts; here one model is, so there is none), delta_len in characters; LC = mean "
              "predicted preference with the length term set to 0. `lc_win_rate_se` is AlpacaEval's standard error "
              "(sem of the predictions; 0 by construction without the difficulty term); the interval is a bootstrap "
              "over prompts that refits the GLM. A pair with an empty answer is decided without the judge: the empty "
              "answer loses.", ""]
    if agreement:
        lines.append(f"Agreement with human labels (`openrelease judge-agreement` on `{agreement.get('file')}`, "
                     f"{agreement.get('n')} pairs): agreement {_f(agreement.get('agreement'))}, Cohen's kappa "
                     f"{_f(agreement.get('kappa'))}, agreement without human ties {_f(agreement.get('agreement_no_tie'))}.")
    else:
        lines.append("Agreement with human labels: none was run" + (f" on `{labels}`" if labels else
                     " (`paths.judge_labels` names no labelled file)") + ".")
    return "\n".join(lines)


def evaluation_notes(inp: Any) -> str:
    m = inp.metrics.get("eval") or {}
    rec = inp.record("evaluate") or {}
    labels = inp.params.paths.judge_labels
    agreement = inp.report("judge_agreement")
    if agreement and labels and agreement.get("file") != labels:
        agreement = None  # a report for another labelled file says nothing about the one params name
    parts = [validity_section(m), eval_ids_section(m), ifeval_section(m, rec), judge_section(m, agreement, labels)]
    return "\n\n".join(p for p in parts if p)
