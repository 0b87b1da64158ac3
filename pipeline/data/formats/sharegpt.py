"""ShareGPT-style preference data as LLaMA-Factory lays it out (e.g. its data/dpo_en_demo.json).

Record: `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "chosen": {"from":
"gpt", "value": str}, "rejected": {...}}`, optionally `"system": str` (LLaMA-Factory's system column),
in a JSON array or JSON lines. `chosen` / `rejected` may also be a one-element list. Roles: human ->
user, gpt -> assistant; tool turns (function_call, observation) are kept under their own names and
rejected by validate's role rule. Ratings follow the hh-rlhf convention (`preference` 1.0 / 0.0).
Generator: "unknown". Ratings scale: 0..1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.formats.common import bad, completion, iter_records, make_row, messages, require

RATING_RANGE = (0.0, 1.0)


def _answer(rec: dict, key: str, path: str, where: int, source: str) -> str:
    value = require(rec, key, (dict, list), path, where, source)
    msgs = messages(value if isinstance(value, list) else [value], key, path, where, source)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise bad(path, where, "one assistant completion", f"{key} must be one gpt/assistant message, got roles "
                  f"{[m['role'] for m in msgs]}", source)
    return msgs[0]["content"]


def read(path: str, source_cfg: Any, exclude: Any = None) -> Iterator[dict]:
    name = source_cfg.name
    for where, rec in iter_records(path, source_cfg, exclude):
        prompt = messages(require(rec, "conversations", list, path, where, name), "conversations", path, where, name)
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            raise bad(path, where, "value type", f"'system' must be a string, got {type(system).__name__}", name)
        if system and system.strip() and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": system}, *prompt]
        completions = [completion(_answer(rec, "chosen", path, where, name), None, {"preference": 1.0}),
                       completion(_answer(rec, "rejected", path, where, name), None, {"preference": 0.0})]
        yield make_row(source_cfg, path, where, rec, prompt, completions)
