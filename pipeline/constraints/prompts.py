"""The project's own constraint prompt files (`data/prompts/*.jsonl`), in IFEval's terms.

A row is `{"id", "prompt", "instruction_id_list", "kwargs"}`: IFEval's input format with a string
`id` in place of IFEval's integer `key`. `instruction_id_list` holds IFEval instruction ids and
`kwargs` one object per id, validated by `pipeline.constraints.ifeval.validate_kwargs`, so the same
checkers rate training completions and score evaluation answers.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.constraints.ifeval import follow_list, validate_kwargs
from pipeline.core.errors import DataError

ROW_KEYS = ("id", "prompt", "instruction_id_list", "kwargs")


def instructions_problem(ids, kwargs) -> str | None:
    """Why an (instruction_id_list, kwargs) pair is invalid, or None."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return f"instruction_id_list must be a non-empty list of IFEval ids, got {ids!r:.80}"
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        return f"kwargs must be a list of {len(ids)} objects (one per instruction id), got {kwargs!r:.80}"
    for i, (iid, kw) in enumerate(zip(ids, kwargs, strict=True)):
        if problem := validate_kwargs(iid, kw):
            return f"instruction {i}: {problem}"
    return None


def read_prompts(path: str | Path) -> list[dict]:
    """Read a prompt file; every row checked, the first bad one a DataError with its file:line.

    Returns the rows with their 1-based `line` added; ids are unique.
    """
    from pipeline.core.io import iter_jsonl

    rows, seen = [], {}
    for lineno, obj in iter_jsonl(path):
        if extra := sorted(set(obj) - set(ROW_KEYS)):
            raise DataError(path, lineno, "prompt row keys", f"unknown key(s) {extra}; allowed: {', '.join(ROW_KEYS)}")
        pid, prompt = obj.get("id"), obj.get("prompt")
        if not isinstance(pid, str) or not pid.strip():
            raise DataError(path, lineno, "id", f"must be a non-blank string, got {pid!r}")
        if pid in seen:
            raise DataError(path, lineno, "unique id", f"{pid!r} already used on line {seen[pid]}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, lineno, "prompt", f"must be a non-blank string, got {prompt!r:.80}")
        if problem := instructions_problem(obj.get("instruction_id_list"), obj.get("kwargs")):
            raise DataError(path, lineno, "instructions", problem)
        seen[pid] = lineno
        rows.append({**obj, "line": lineno})
    if not rows:
        raise DataError(path, None, "non-empty", "the prompt file has no rows")
    return rows


def held_out_ids(train_rows: list[dict], eval_rows: list[dict]) -> tuple[str, ...]:
    """Instruction ids the evaluation prompts use and the training prompts never do (sorted)."""
    seen = {i for r in train_rows for i in r["instruction_id_list"]}
    return tuple(sorted({i for r in eval_rows for i in r["instruction_id_list"]} - seen))


def check_row(row: dict, response: str, *, loose: bool = False) -> list[bool]:
    """IFEval verdicts of `response` for one prompt row, one per instruction."""
    return follow_list(row["instruction_id_list"], row["kwargs"], row["prompt"], response, loose=loose)
