"""IFEval (Zhou et al., 2023) as published: the 25 instruction ids, strict and loose verdicts, I/O.

Public API (used by `openrelease ifeval`, the `rate` stage and the `evaluate` stage):
- `INSTRUCTION_IDS`: the 25 ids of the reference registry, in its order.
- `follows(instruction_id, kwargs, prompt, response, *, loose=False) -> bool`
- `follow_list(instruction_ids, kwargs_list, prompt, response, *, loose=False) -> list[bool]`
- `validate_kwargs(instruction_id, kwargs) -> str | None`: the problem, or None.
- `read_ifeval(path)`: IFEval's input format (`key`, `prompt`, `instruction_id_list`, `kwargs`), every
  row validated; None-valued kwargs are dropped (the Hugging Face copy of the data stores every
  possible kwarg with None, as lm-evaluation-harness drops them); a bad line is a DataError with file:line.
- `read_responses(path)`, `evaluate(inputs, responses)`, `write_results(path, outputs)`, `report(outputs)`.

Semantics, matching google-research `instruction_following_eval/evaluation_lib.py`:
- strict: an instruction is followed when the response is not blank (`response.strip()`) and the
  checker passes. So a blank response fails every instruction in IFEval's own loop.
- loose: the same test on 8 variants of the response, {as is, first line removed, last line removed,
  both} x {as is, every `*` removed} (the removed-line variants are stripped); followed if any
  non-blank variant passes.
- prompt-level accuracy: share of prompts whose every instruction is followed; instruction-level:
  share of all instructions followed (pooled); the per-category (`keywords`, ...) and per-id
  accuracies are over instructions.
The checker rules are in `pipeline.constraints.instructions`, the tokenizers in
`pipeline.constraints.text`. Where this cannot match the reference exactly:
- langdetect is seeded (0); the reference leaves it unseeded, so on short or mixed-language text
  the reference's own verdict for `language:response_language` and `change_case:english_*` can
  differ from run to run; ours is one of its possible answers, always the same one.
- Punkt sentence counts use NLTK 3.10's algorithm on NLTK's `punkt_tab` English parameters; the
  reference ran with whichever NLTK its user had (with `english.pickle`); NLTK's Punkt changed
  little across 3.x but is not frozen.
- a kwarg the reference would draw at random (missing, negative, unknown language) is an input
  error here, not a random draw.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.constraints.instructions import CHECKERS, kwargs_problem
from pipeline.core.errors import DataError

INSTRUCTION_IDS: tuple[str, ...] = tuple(CHECKERS)
OUTPUT_KEYS = ("follow_all_instructions", "follow_instruction_list", "instruction_id_list", "prompt", "response")


def validate_kwargs(instruction_id: str, kwargs: Any) -> str | None:
    """The problem with `kwargs` for `instruction_id` (unknown id, unknown/missing/bad kwarg), or None."""
    return kwargs_problem(instruction_id, kwargs)


def category(instruction_id: str) -> str:
    """IFEval's tier-0 category: the part before the colon (`keywords`, `length_constraints`, ...)."""
    return instruction_id.split(":")[0]


def response_variants(response: str) -> list[str]:
    """The 8 responses IFEval's loose mode tries, in the reference's order."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def _check(instruction_id: str, kwargs: dict, response: str) -> bool:
    fn, _ = CHECKERS[instruction_id]
    return bool(response.strip()) and bool(fn(response, **kwargs))


def follows(instruction_id: str, kwargs: dict, prompt: str, response: str, *, loose: bool = False) -> bool:
    """Whether `response` follows one instruction, strict or loose, as IFEval judges it.

    `prompt` is accepted for parity with the reference (which would pass it to an instruction whose
    arguments include `prompt`; none of the 25 does). Bad kwargs raise DataError.
    """
    if problem := kwargs_problem(instruction_id, kwargs):
        raise DataError("<instruction>", None, "IFEval kwargs", problem)
    variants = response_variants(response) if loose else [response]
    return any(_check(instruction_id, kwargs, r) for r in variants)


def follow_list(instruction_ids: Sequence[str], kwargs_list: Sequence[dict], prompt: str, response: str,
                *, loose: bool = False) -> list[bool]:
    """`follows` for each instruction of one prompt, in order (the reference's `follow_instruction_list`)."""
    if len(instruction_ids) != len(kwargs_list):
        raise DataError("<instruction>", None, "IFEval kwargs",
                        f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs objects")
    return [follows(i, k, prompt, response, loose=loose) for i, k in zip(instruction_ids, kwargs_list, strict=True)]


def _row_problem(obj: dict) -> tuple[str, str] | None:
    """(rule, detail) for an invalid IFEval input row, or None."""
    if extra := sorted(set(obj) - {"key", "prompt", "instruction_id_list", "kwargs"}):
        return "IFEval input keys", f"unknown key(s) {extra}; allowed: key, prompt, instruction_id_list, kwargs"
    key, prompt, ids, kws = obj.get("key"), obj.get("prompt"), obj.get("instruction_id_list"), obj.get("kwargs")
    if not isinstance(key, int) or isinstance(key, bool):
        return "key", f"must be an integer, got {key!r:.60}"
    if not isinstance(prompt, str) or not prompt.strip():
        return "prompt", f"must be a non-blank string, got {prompt!r:.60}"
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return "instruction_id_list", f"must be a non-empty list of ids, got {ids!r:.80}"
    if not isinstance(kws, list) or len(kws) != len(ids):
        return "kwargs", f"must be a list of {len(ids)} objects (one per instruction id), got {kws!r:.80}"
    for i, (iid, kw) in enumerate(zip(ids, kws, strict=True)):
        if problem := kwargs_problem(iid, {k: v for k, v in kw.items() if v is not None} if isinstance(kw, dict) else kw):
            return "kwargs", f"instruction {i}: {problem}"
    return None


def read_ifeval(path: str | Path) -> list[dict]:
    """IFEval input rows `{key, prompt, instruction_id_list, kwargs, line}`, every one validated."""
    from pipeline.core.io import iter_jsonl

    rows: list[dict] = []
    keys: dict[int, int] = {}
    for lineno, obj in iter_jsonl(path):
        if bad := _row_problem(obj):
            raise DataError(path, lineno, *bad)
        if obj["key"] in keys:
            raise DataError(path, lineno, "unique key", f"{obj['key']} already used on line {keys[obj['key']]}")
        keys[obj["key"]] = lineno
        kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in obj["kwargs"]]
        rows.append({"key": obj["key"], "prompt": obj["prompt"], "instruction_id_list": list(obj["instruction_id_list"]),
                     "kwargs": kwargs, "line": lineno})
    if not rows:
        raise DataError(path, None, "non-empty", "the IFEval input file has no rows")
    return rows


def read_responses(path: str | Path) -> dict[str, str]:
    """IFEval's responses format: JSON lines with `prompt` and `response`, mapped prompt -> response.

    Repeating a prompt with the same response is allowed; with a different one it is an error
    (the reference silently keeps the last).
    """
    from pipeline.core.io import iter_jsonl

    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str):
            raise DataError(path, lineno, "prompt", f"must be a string, got {prompt!r:.60}")
        if not isinstance(response, str):
            raise DataError(path, lineno, "response", f"must be a string (may be empty), got {response!r:.60}")
        if prompt in out and out[prompt] != response:
            raise DataError(path, lineno, "one response per prompt", f"this prompt already has another response on line {first[prompt]}")
        out[prompt] = response
        first.setdefault(prompt, lineno)
    return out


def evaluate(inputs: list[dict], responses: dict[str, str], where: str | Path = "<inputs>") -> tuple[list[dict], list[dict]]:
    """(strict, loose) outputs in IFEval's output format, one per input row, in input order."""
    strict, loose = [], []
    for row in inputs:
        if row["prompt"] not in responses:
            raise DataError(where, row.get("line"), "a response for every prompt",
                            f"no response has this prompt (key {row.get('key')}): {row['prompt'][:60]!r}")
        response = responses[row["prompt"]]
        for out, is_loose in ((strict, False), (loose, True)):
            flags = follow_list(row["instruction_id_list"], row["kwargs"], row["prompt"], response, loose=is_loose)
            out.append({"follow_all_instructions": all(flags), "follow_instruction_list": flags,
                        "instruction_id_list": row["instruction_id_list"], "prompt": row["prompt"], "response": response})
    return strict, loose


def write_results(path: str | Path, outputs: list[dict]) -> Path:
    """One JSON object per line, keys in the reference's order, `json.dumps` defaults (ASCII-escaped)."""
    from pipeline.core.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps({k: o[k] for k in OUTPUT_KEYS}) + "\n" for o in outputs))


def accuracy(outputs: list[dict]) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, and per category and per id (over instructions)."""
    if not outputs:
        raise ValueError("accuracy of no outputs")
    by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_id: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    n_inst = ok_inst = 0
    for o in outputs:
        for iid, ok in zip(o["instruction_id_list"], o["follow_instruction_list"], strict=True):
            for table, k in ((by_cat, category(iid)), (by_id, iid)):
                table[k][0] += int(ok)
                table[k][1] += 1
        n_inst += len(o["follow_instruction_list"])
        ok_inst += sum(o["follow_instruction_list"])
    return {
        "prompt_level": sum(o["follow_all_instructions"] for o in outputs) / len(outputs),
        "instruction_level": ok_inst / n_inst,
        "n_prompts": len(outputs), "n_instructions": n_inst,
        "by_category": {k: v[0] / v[1] for k, v in sorted(by_cat.items())},
        "by_instruction": {k: v[0] / v[1] for k, v in sorted(by_id.items())},
    }


def report(outputs: list[dict]) -> str:
    """The reference's `print_report` text: prompt- and instruction-level, then per category, per id."""
    acc = accuracy(outputs)
    lines = [f"prompt-level: {acc['prompt_level']}", f"instruction-level: {acc['instruction_level']}", ""]
    lines += [f"{k} {v}" for k, v in acc["by_category"].items()] + [""]
    lines += [f"{k} {v}" for k, v in acc["by_instruction"].items()]
    return "\n".join(lines)
