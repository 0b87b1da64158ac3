"""TRL preference pairs: `prompt` / `chosen` / `rejected`, standard (strings) or conversational (messages).

The four TRL layouts are read:
- explicit prompt, standard:        {"prompt": str, "chosen": str, "rejected": str}
- explicit prompt, conversational:  {"prompt": [msgs], "chosen": [one assistant msg], "rejected": [...]}
- implicit prompt, conversational:  {"chosen": [whole conversation], "rejected": [whole conversation]};
  the prompt is the longest common prefix of messages, as trl.extract_prompt does
- implicit prompt, standard:        {"chosen": str, "rejected": str}; the prompt is the longest common
  character prefix (minus a trailing space), again as trl.extract_prompt does
A string prompt becomes one user message; a string completion becomes the assistant's content. The
completion after the prompt must be exactly one message. Ratings follow the hh-rlhf convention:
`{"preference": 1.0}` chosen, `{"preference": 0.0}` rejected (score columns such as `score_chosen` are
not used). Generator: "unknown". Ratings scale: 0..1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.formats.common import bad, completion, iter_records, make_row, messages

RATING_RANGE = (0.0, 1.0)


def _char_prefix(a: str, b: str) -> int:
    """trl.extract_prompt's rule for strings, quirks included: the common prefix minus a trailing space;
    when one string starts with the other, the prompt stops one character short of the shorter one."""
    idx = 0
    for idx in range(min(len(a), len(b))):  # noqa: B007 - the loop variable is the result, as in TRL
        if a[idx] != b[idx]:
            if idx > 0 and a[idx - 1] == " ":
                idx -= 1
            break
    return idx


def _split_implicit(rec: dict, path: str, where: int, source: str) -> tuple[list[dict], Any, Any]:
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = _char_prefix(chosen, rejected)
        return [{"role": "user", "content": chosen[:k]}], chosen[k:], rejected[k:]
    c = messages(chosen, "chosen", path, where, source)
    r = messages(rejected, "rejected", path, where, source)
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    return c[:k], c[k:], r[k:]


def _completion_text(value: Any, key: str, path: str, where: int, source: str) -> str:
    if isinstance(value, str):
        return value
    msgs = messages(value, key, path, where, source)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = [m["role"] for m in msgs]
        raise bad(path, where, "one assistant completion", f"{key} after the prompt must be one assistant "
                  f"message, got roles {roles}", source)
    return msgs[0]["content"]


def read(path: str, source_cfg: Any, exclude: Any = None) -> Iterator[dict]:
    name = source_cfg.name
    for where, rec in iter_records(path, source_cfg, exclude):
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise bad(path, where, "required key", f"missing key {key!r}; keys are {sorted(rec)[:12]}", name)
            if not isinstance(rec[key], (str, list)):
                raise bad(path, where, "value type", f"{key!r} must be a string or a list of messages, got "
                          f"{type(rec[key]).__name__}", name)
        if "prompt" in rec:
            p = rec["prompt"]
            if isinstance(p, str):
                prompt = [{"role": "user", "content": p}]
            elif isinstance(p, list):
                prompt = messages(p, "prompt", path, where, name)
            else:
                raise bad(path, where, "value type", f"'prompt' must be a string or a list of messages, got "
                          f"{type(p).__name__}", name)
            chosen, rejected = rec["chosen"], rec["rejected"]
        else:
            prompt, chosen, rejected = _split_implicit(rec, path, where, name)
        completions = [completion(_completion_text(chosen, "chosen", path, where, name), None, {"preference": 1.0}),
                       completion(_completion_text(rejected, "rejected", path, where, name), None,
                                  {"preference": 0.0})]
        yield make_row(source_cfg, path, where, rec, prompt, completions)
