"""The parts of the model card a reader looks at first and last: the results summary, the quick start
and the citations; and a description for every evaluation metric key (the full table folds them)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.release.manifest import ReleaseInfo

_WHO = {"_policy": "this model", "_base": "the base model", "_delta": "difference, this model - base"}
_WHERE = {"test_": "test prompts", "ifeval_": "IFEval subset", "general_": "general prompts",
          "dev_": "dev prompts (used to choose, never reported as a result)"}
_STEMS = {
    "pass_rate": "share of prompts whose every instruction is met (degenerate answers fail)",
    "constraint_pass_rate": "share of single instructions met",
    "degenerate_rate": "share of degenerate answers (params validity)",
    "empty_rate": "share of empty answers", "unfinished_rate": "share of answers cut at max_new_tokens",
    "too_short_rate": "share of too-short answers", "repetition_rate": "share of looping answers",
    "repeated_sentence_rate": "share of answers repeating one sentence", "prompt_copy_rate": "share copying the prompt",
    "reused_rate": "share of answers reused across prompts", "repetition_mean": "mean word 4-gram repetition",
    "off_topic_rate": "share of short answers sharing no topic word with the prompt",
    "prompt_copy_mean": "mean share of the answer's word 3-grams found in the prompt",
    "prompt_strict": "prompt-level strict accuracy", "prompt_loose": "prompt-level loose accuracy",
    "inst_strict": "instruction-level strict accuracy", "inst_loose": "instruction-level loose accuracy",
    "prompt_strict_valid": "prompt-level strict accuracy, degenerate answers fail",
    "heldout_inst_strict": "instruction-level strict accuracy on instruction ids training never used",
    "heldout_inst_loose": "instruction-level loose accuracy on instruction ids training never used",
    "indist_inst_strict": "instruction-level strict accuracy on instruction ids training used",
    "indist_inst_loose": "instruction-level loose accuracy on instruction ids training used",
    "length": "mean answer length (tokens)",
}


def describe(key: str) -> str:
    """A description for any metrics/eval.json key, from its prefix (where), stem (what) and suffix (whose)."""
    if key.startswith("panel_") and key.endswith("_pass_rate"):
        return f"pass rate of the trivial answer `{key[6:-10]}` on the test prompts (no model involved)"
    rest, where, who = key, [], ""
    for prefix, label in _WHERE.items():
        if rest.startswith(prefix):
            rest, where = rest[len(prefix):], [label]
            break
    if rest.startswith("ifeval_"):
        rest = rest[len("ifeval_"):]
        where = where or ["IFEval subset"]
        where = [f"{where[0]}, IFEval rules"] if where[0] != "IFEval subset" else where
    for suffix, label in _WHO.items():
        if rest.endswith(suffix):
            rest, who = rest[: -len(suffix)], label
            break
    if rest.startswith("n_"):
        what = "count of " + rest[2:].replace("_", " ")
    else:
        what = _STEMS.get(rest, rest.replace("_", " "))
    return "; ".join([what, *where, *([who] if who else [])])


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "n/a"


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (lo, hi))
    return f" (95% CI {lo:.3f}-{hi:.3f})" if ok else ""


def results_summary(m: dict[str, Any], n_test: Any, save_dtype: str | None) -> str:
    """Three lines a reader needs: the headline with its interval, the base and the trivial floor."""
    lines = [
        f"- **Verifiable instruction following** (held-out test prompts, {n_test if n_test is not None else 'n/a'}): "
        f"this model **{_f(m.get('pass_rate_policy'))}**{_ci(m, 'pass_rate_policy')}, base model "
        f"{_f(m.get('pass_rate_base'))}{_ci(m, 'pass_rate_base')}; difference {_f(m.get('pass_rate_delta'))}"
        f"{_ci(m, 'pass_rate_delta')}. The best trivial answer (empty, echo, one fixed answer, ...) scores "
        f"{_f(m.get('pass_rate_floor'))} (`pass_rate_floor`).",
    ]
    if "ifeval_prompt_strict_policy" in m:
        lines.append(f"- **IFEval prompt-level strict accuracy** on the IFEval subset ({m.get('n_ifeval_prompts')} "
                     f"prompts): this model {_f(m.get('ifeval_prompt_strict_policy'))}"
                     f"{_ci(m, 'ifeval_prompt_strict_policy')}, base {_f(m.get('ifeval_prompt_strict_base'))}.")
    if "pref_accuracy" in m:
        lines.append(f"- **Held-out preference accuracy**: {_f(m.get('pref_accuracy'))}{_ci(m, 'pref_accuracy')}.")
    if save_dtype:
        lines.append(f"- Weights are saved in **{save_dtype}**; every figure here was measured on these saved "
                     "weights, upcast to float32 on CPU (the upcast is exact).")
    return "\n".join(lines)


def quick_start(info: ReleaseInfo, base_id: str, base_revision: str | None) -> str:
    rev = f', revision="{base_revision}"' if base_revision else ""
    return "\n".join([
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'repo, tag = "{info.model_repo}", "{info.version}"',
        "tok = AutoTokenizer.from_pretrained(repo, revision=tag)",
        'model = AutoModelForCausalLM.from_pretrained(repo, revision=tag, torch_dtype="auto")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about tea, all lowercase."}],',
        '                              add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        'out = model.generate(**ids, max_new_tokens=64, do_sample=False)',
        'print(tok.decode(out[0, ids["input_ids"].shape[-1]:], skip_special_tokens=True))', "```", "",
        "Works with transformers 4.57 and 5.x. The LoRA adapter (in `adapter/`) names its base model "
        f"(`{base_id}`{rev.replace('revision=', 'revision ')}) and loads with PEFT:", "",
        "```python", "from peft import AutoPeftModelForCausalLM", "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{info.model_repo}", subfolder="adapter", '
        f'revision="{info.version}")', "```", "",
        "The adapter was trained on the base model's weights as this pipeline read them (see Training procedure); "
        "on the Hub's original weights it gives close, not identical, answers. To train further with TRL, load "
        "the pairs with `datasets.load_dataset` and pass them to `trl.DPOTrainer`.",
    ])


CITATIONS = """```bibtex
@inproceedings{rafailov2023dpo,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and Manning, Christopher D. and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}

@misc{vonwerra2020trl,
  title        = {{TRL: Transformer Reinforcement Learning}},
  author       = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
  year         = {2020},
  publisher    = {GitHub},
  howpublished = {\\url{https://github.com/huggingface/trl}}
}
```"""


def rounds_section(inp: Any) -> str:
    """Iterative DPO (params `rounds`): one row per round, against the base model and the round before, the
    shipped round and why; empty with one round, so a single-pass card is unchanged. The plot of the
    headline and degeneration across rounds is among the card's plots (rounds/<rk>/rounds.png)."""
    from pipeline.core.rounds import read_summary

    summary = read_summary(inp.root, inp.params)
    if not summary:
        return ""

    def ci(m: dict[str, Any] | None, key: str) -> str:
        m = m or {}
        v, lo, hi = m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
            return f"{v:.3f}"
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    head = ["round", "sampled by", "pass rate (test)", "vs base", "vs previous round", "degenerate (test)",
            "degenerate vs previous", "KL to base", "length (tokens)", "length ratio", "dev pass-rate delta"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rounds"]:
        m, vp = r.get("metrics") or {}, r.get("vs_previous")
        sampler = f"`{r['sampled_by']}` ({str(r.get('sampled_by_sha256'))[:12]})"
        cells = [r["round"] + (" (released)" if r["round"] == summary["published"] else ""), sampler,
                 ci(m, "pass_rate_policy"), ci(m, "pass_rate_delta"), ci(vp, "pass_rate_vs_previous") if vp else "–",
                 ci(m, "test_degenerate_rate_policy"), ci(vp, "degenerate_rate_vs_previous") if vp else "–",
                 ci(m, "kl"), ci(m, "length_policy"), ci(m, "length_ratio"), ci(m, "dev_pass_rate_delta")]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n\n## DPO rounds\n\n"
            f"{len(summary['rounds'])} rounds of on-policy DPO: each round after the first sampled its preference data "
            f"with the previous round's model (same decoding and validity rules), trained from "
            f"{'the previous round' if summary['start_from'] == 'previous' else 'the base model'} on "
            f"{'its own pairs' if summary['data'] == 'replace' else 'every round so far'}. Test prompts, 95% intervals "
            "over prompts; against the previous round the two models' answers are paired by prompt. "
            f"This release is {summary['published']} ({summary['why']}).\n\n" + "\n".join(lines))
