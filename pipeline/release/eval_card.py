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
    if "n_test_ifeval_prompts" not in m:
        return ""
    return "\n".join([
        "### Held-out constraint prompts by instruction id",
        "",
        f"{m.get('n_test_ifeval_instructions')} instructions in `paths.test_prompts`: "
        f"{m.get('n_test_ifeval_heldout_instructions')} with ids the training prompts never use, "
        f"{m.get('n_test_ifeval_indist_instructions')} with ids they use (IFEval's strict and loose rules).",
        "",
        "| metric | base | this model |", "|---|---|---|",
        _row(m, "held-out ids, instruction-level strict", "test_ifeval_heldout_inst_strict"),
        _row(m, "held-out ids, instruction-level loose", "test_ifeval_heldout_inst_loose"),
        _row(m, "in-distribution ids, instruction-level strict", "test_ifeval_indist_inst_strict"),
        _row(m, "in-distribution ids, instruction-level loose", "test_ifeval_indist_inst_loose"),
        _row(m, "prompt-level strict with the validity rule (= pass_rate)", "test_ifeval_prompt_strict_valid"),
    ])


RULE_LABELS = {
    "empty": "empty", "too_short": "too short (fewer than `validity.min_words` words)",
    "repetition": "looping (repeated word n-grams, or the whole answer said again)",
    "repeated_sentence": "one sentence said again and again", "prompt_copy": "copies the prompt (or only its words)",
    "off_topic": "a short answer sharing no topic word with the prompt",
    "reused": "one answer given to several prompts", "unfinished": "cut at max_new_tokens",
}


def panel_rates(m: dict) -> dict[str, float]:
    """The trivial-answer panel's members and pass rates, in evaluate's order (`panel_<member>_pass_rate`)."""
    return {k[len("panel_"):-len("_pass_rate")]: v for k, v in m.items()
            if k.startswith("panel_") and k.endswith("_pass_rate") and isinstance(v, (int, float))}


def validity_section(m: dict) -> str:
    panel = panel_rates(m)
    best = max(panel, key=lambda n: panel[n]) if panel else None
    lines = [
        "### Validity rule and what would game the metrics",
        "",
        "The headline pass rates (`pass_rate_base`, `pass_rate_policy`, test prompts) count a degenerate answer as a "
        "failed answer that meets none of its prompt's instructions (`pipeline/constraints/validity.py`, thresholds "
        "in params `validity`): empty, too short, looping, copying the prompt, one answer reused across prompts, or "
        "cut at `max_new_tokens`. The `rate` stage applies the same rules, so no degenerate sample was ever a chosen "
        "reply in training. IFEval's reference numbers (`ifeval_prompt_strict_*`, `test_ifeval_prompt_strict_*` "
        "without `_valid`) do not apply the rule, so they compare with published figures.",
        "",
        "| share of all evaluation answers (95% CI) | base | this model |", "|---|---|---|",
        _row(m, "**degenerate (any rule)**", "degenerate_rate"),
    ]
    lines += [_row(m, label, f"{rule}_rate") for rule, label in RULE_LABELS.items()]
    lines += [
        f"| mean word 4-gram repetition | {_f(m.get('repetition_mean_base'))} | {_f(m.get('repetition_mean_policy'))} |",
        "",
        f"Change in the degenerate share (this model - base): {_f(m.get('degenerate_rate_delta'))} "
        f"{_ci(m, 'degenerate_rate_delta')}; by prompt set: test {_f(m.get('test_degenerate_rate_policy'))} "
        f"(base {_f(m.get('test_degenerate_rate_base'))}), IFEval subset {_f(m.get('ifeval_degenerate_rate_policy'))} "
        f"(base {_f(m.get('ifeval_degenerate_rate_base'))}), general prompts {_f(m.get('general_degenerate_rate_policy'))} "
        f"(base {_f(m.get('general_degenerate_rate_base'))}).",
        "",
        "**Trivial-answer panel.** Answers that need no model, scored on the test prompts by the same code as the "
        f"headline. The best of them is the floor, **{_f(m.get('pass_rate_floor'))}** "
        f"({best or MISSING}); the release gate `trivial-floor` refuses a model whose headline does not "
        "exceed it.",
        "",
        "| answer | pass rate |", "|---|---|",
    ]
    lines += [f"| `{name}` | {_f(rate)} |" for name, rate in panel.items()]
    lines += [
        "",
        f"Length ratio (this model / base, tokens): {_f(m.get('length_ratio'))}; release gates bound it from both "
        "sides (`publish.thresholds.length_ratio`).",
        "",
        f"Held-out preference accuracy: {_f(m.get('pref_n'))} test pairs from {_f(m.get('pref_n_prompts'))} prompts; "
        "its interval resamples prompts (a cluster bootstrap), and none is given from fewer than "
        "`evaluate.bootstrap.min_clusters` prompts.",
    ]
    return "\n".join(lines)


def judge_name(judge: dict | None) -> str:
    """The judge and template every judge figure belongs to, from the evaluate record (`extra.judge`)."""
    if not judge or not isinstance(judge.get("id"), dict):
        return f"Judge: {MISSING} (the evaluate record names no judge)."
    from pipeline.core.lineage import sha256_json

    jid = judge["id"]
    if jid.get("kind") == "openai":
        what = f"`{jid.get('model')}` at {jid.get('base_url')}" + (
            f", answered by snapshot `{judge['snapshot']}`" if judge.get("snapshot") else "")
    else:
        what = f"model sha256 `{str(jid.get('model_sha256', MISSING))[:12]}`"
    return (f"Judge: `{jid.get('kind')}`, {what}; judge id sha256 `{sha256_json(jid)[:12]}`, template "
            f"`{judge.get('template', MISSING)}` sha256 `{str(judge.get('template_sha256', MISSING))[:12]}`. "
            "Every judge figure below belongs to this judge and template.")


def _same_judge(report: dict, judge: dict | None) -> bool:
    return bool(judge) and report.get("judge") == judge.get("id") and \
        report.get("template_sha256") == judge.get("template_sha256")


def judge_section(m: dict, agreement: list[dict] | dict | None, labels: str | None, judge: dict | None = None) -> str:
    """Reliability, agreement with people from this run (`judge_human_*`), and the `openrelease
    judge-agreement` reports whose judge id and template hash are the evaluated judge's."""
    reports = [agreement] if isinstance(agreement, dict) else list(agreement or [])
    lines = ["### Judge", ""]
    if "judge_order_consistency" not in m:
        return "\n".join([*lines, f"Judge: {MISSING}"])
    if judge is not None:
        lines += [judge_name(judge), ""]
    threshold = m.get("judge_min_order_consistency")
    consistency = m.get("judge_order_consistency")
    if "judge_reliable" not in m:
        lines.append(f"Order consistency {_f(consistency)}; this evaluation did not rate the "
                     "judge's reliability (no `judge_reliable` in its results).")
    elif m.get("judge_reliable") == 0:
        why = []
        if isinstance(consistency, (int, float)) and isinstance(threshold, (int, float)) and consistency < threshold:
            why.append(f"it named the same winner in both presentation orders for {_f(consistency)} of the pairs, "
                       f"below the threshold {_f(threshold)} (`evaluate.judge.min_order_consistency`; a tie names no "
                       "winner); it mostly picks by position")
        if m.get("judge_human_reliable") == 0:
            why.append("its agreement with people is not told apart from chance (Cohen's kappa's interval includes 0, "
                       "or none could be computed)")
        lines.append("**The judge is unreliable**: " + ("; ".join(why) or "the evaluation marked it so") +
                     ". Its win rates are listed above for completeness only: they are not in the model-index and no "
                     "release gate uses them.")
    else:
        lines.append(f"Order consistency {_f(consistency)} (threshold {_f(threshold)})" +
                     (", and Cohen's kappa with people above 0" if m.get("judge_human_reliable") == 1 else "") +
                     ": the judge's win rates are reported and gated.")
    lines += ["", "Length-controlled win rate (`lc_win_rate`): AlpacaEval 2's GLM, logit P(this model preferred) = "
              "theta + phi * tanh(delta_len / sd(delta_len)) (+ psi * instruction difficulty when several models are "
              "judged on the same prompts; here one model is, so there is none), delta_len in characters; LC = mean "
              "predicted preference with the length term set to 0. `lc_win_rate_se` is AlpacaEval's standard error "
              "(sem of the predictions; 0 by construction without the difficulty term); the interval is a bootstrap "
              "over prompts that refits the GLM. A pair with an empty answer is decided without the judge: the empty "
              "answer loses.", ""]
    if "judge_human_n_judged" in m:
        lines.append(f"Agreement with people, measured in this evaluation on `{labels}` (`paths.judge_labels`): "
                     f"{_f(m.get('judge_human_n_judged'))} pairs judged ({_f(m.get('judge_human_n_rule'))} settled by "
                     "the blank-answer rule, not counted): agreement "
                     f"{_f(m.get('judge_human_agreement'))} {_ci(m, 'judge_human_agreement')}, Cohen's kappa "
                     f"{_f(m.get('judge_human_kappa'))} {_ci(m, 'judge_human_kappa')} (bootstrap over pairs); order "
                     f"consistency on these pairs {_f(m.get('judge_human_order_consistency'))}.")
        if m.get("judge_human_reliable") == 0:
            lines.append("**The judge does not agree with people beyond chance** on this set: kappa's interval "
                         "includes 0 (or none could be computed), so its win rates gate nothing.")
    else:
        lines.append("Agreement with people: none was run in this evaluation" + (f" (`{labels}`)" if labels else
                     " (`paths.judge_labels` names no labelled file)") + ".")
    mine = [r for r in reports if _same_judge(r, judge)]
    for r in mine:
        lines.append(f"`openrelease judge-agreement` on `{r.get('file')}`: {_f(r.get('n'))} pairs judged "
                     f"({_f(r.get('n_rule', 0))} settled by rule), agreement {_f(r.get('agreement'))} "
                     f"{_ci(r, 'agreement')}, Cohen's kappa {_f(r.get('kappa'))} {_ci(r, 'kappa')}, agreement without "
                     f"human ties {_f(r.get('agreement_no_tie'))}.")
    if len(reports) > len(mine):
        k = len(reports) - len(mine)
        lines.append(f"{k} agreement {'report' if k == 1 else 'reports'} for another judge or template "
                     f"{'was' if k == 1 else 'were'} left out (a report counts only for the judge id and template "
                     "hash it names).")
    return "\n".join(lines)


def evaluation_notes(inp: Any) -> str:
    m = inp.metrics.get("eval") or {}
    rec = inp.record("evaluate") or {}
    labels = inp.params.paths.judge_labels
    judge = (rec.get("extra") or {}).get("judge")
    # every `openrelease judge-agreement` report (reports/judge_agreement/*.json, or the older single file);
    # judge_section keeps those of the judge and template this evaluation used, whatever their file names
    reports = [r for name in sorted(inp.reports) if name.startswith("judge_agreement")
               for r in [inp.report(name)] if isinstance(r, dict)]
    parts = [validity_section(m), eval_ids_section(m), ifeval_section(m, rec), judge_section(m, reports, labels, judge)]
    return "\n\n".join(p for p in parts if p)
