"""Anthropic hh-rlhf: `chosen` and `rejected` whole transcripts in `\\n\\nHuman:` / `\\n\\nAssistant:` turns.

The two transcripts share every turn but the last assistant reply. Turns are split on the markers,
stripped, and consecutive turns by the same speaker are merged (joined by a blank line): a few
transcripts in the public files repeat `\\n\\nAssistant:` and would otherwise not share a prefix. The
shared turns are the prompt (kept as messages, multi-turn included); the two final assistant turns are
the completions. Convention for the ratings: `{"preference": 1.0}` for chosen and `{"preference": 0.0}`
for rejected, so the mean-of-ratings score ranks them as the source did. Generator: "unknown" (the
source does not name its models). Ratings scale: 0..1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pipeline.data.formats.common import bad, completion, excerpt, iter_records, make_row, require

RATING_RANGE = (0.0, 1.0)
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict]:
    """Messages of one transcript; text before the first marker (normally empty) is an error upstream."""
    parts = _TURN.split(text)
    out: list[dict] = []
    for marker, body in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _ROLE[marker], body.strip()
        if out and out[-1]["role"] == role:
            out[-1]["content"] = f"{out[-1]['content']}\n\n{content}"
        else:
            out.append({"role": role, "content": content})
    return out


def read(path: str, source_cfg: Any, exclude: Any = None) -> Iterator[dict]:
    name = source_cfg.name
    for where, rec in iter_records(path, source_cfg, exclude):
        turns = {}
        for key in ("chosen", "rejected"):
            text = require(rec, key, str, path, where, name)
            if _TURN.split(text, maxsplit=1)[0].strip():
                raise bad(path, where, "hh-rlhf transcript", f"{key} must start with '\\n\\nHuman:': {excerpt(text)}", name)
            turns[key] = parse_transcript(text)
        chosen, rejected = turns["chosen"], turns["rejected"]
        for key, t in turns.items():
            if not t or t[-1]["role"] != "assistant":
                raise bad(path, where, "hh-rlhf transcript", f"{key} must end with an Assistant turn", name)
        if chosen[:-1] != rejected[:-1]:
            n = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected)))
            raise bad(path, where, "hh-rlhf shared prompt", f"chosen and rejected differ before their last "
                      f"assistant turn (at turn {n + 1})", name)
        completions = [completion(chosen[-1]["content"], None, {"preference": 1.0}),
                       completion(rejected[-1]["content"], None, {"preference": 0.0})]
        yield make_row(source_cfg, path, where, rec, chosen[:-1], completions)
