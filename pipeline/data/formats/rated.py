"""Per-response ratings, HelpSteer style: one response per row with numeric attribute scores.

Record: `{"prompt": str, "response": str, "helpfulness": 3, "correctness": 3, "coherence": 4,
"complexity": 2, "verbosity": 1}` (nvidia/HelpSteer, HelpSteer2). Rows with the same prompt text are
grouped into one prompt group (in the order prompts first appear); the group's position is the
position of its first row. Only the columns in the source's `aspects` are ratings (default
helpfulness, correctness, coherence: HelpSteer's complexity and verbosity describe a response, they
do not grade it); a missing aspect column is an error, null is "not rated". A `model` string column,
when present, is the generator. Multi-turn prompts stay one user message, as the source wrote them.
Ratings scale: 0..4.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.formats.common import bad, completion, iter_records, make_row, rating, require

RATING_RANGE = (0.0, 4.0)
DEFAULT_ASPECTS = ("helpfulness", "correctness", "coherence")


def read(path: str, source_cfg: Any, exclude: Any = None) -> Iterator[dict]:
    name = source_cfg.name
    aspects = list(getattr(source_cfg, "aspects", None) or DEFAULT_ASPECTS)
    groups: dict[str, tuple[int, dict, list[dict], list[dict]]] = {}  # prompt -> (where, first, completions, records)
    for where, rec in iter_records(path, source_cfg, exclude):
        prompt = require(rec, "prompt", str, path, where, name)
        response = require(rec, "response", str, path, where, name)
        ratings = {}
        for a in aspects:
            if a not in rec:
                raise bad(path, where, "required key", f"missing rating column {a!r} (source aspects: {aspects})", name)
            ratings[a] = rating(rec[a], a, path, where, name)
        model = rec.get("model") if isinstance(rec.get("model"), str) else None
        if prompt not in groups:
            groups[prompt] = (where, rec, [], [])
        groups[prompt][2].append(completion(response, model, ratings))
        groups[prompt][3].append(rec)  # every response row is a raw record the group derives from
    for prompt, (where, rec, completions, records) in groups.items():
        yield make_row(source_cfg, path, where, rec, [{"role": "user", "content": prompt}], completions, records)
