"""UltraFeedback (openbmb/UltraFeedback): one instruction, several completions rated per aspect.

Record: `{"instruction": str, "completions": [{"model": str, "response": str, "annotations":
{aspect: {"Rating": "1".."5" | "N/A", "Rationale": str, ...}}}], "models": [...], ...}`. Extra keys
(`source`, `correct_answers`, `custom_system_prompt`, `fine-grained_score`, `overall_score`, ...) are
ignored; in particular the recorded `overall_score` is not used (it is wrong for some rows), the score
is later the mean of the aspect ratings. An aspect may also be a list of such objects (some exports do
that): its rating is then the mean of the list's ratings. The on-policy `rate` stage writes this layout,
with one extra per completion that is read here: `finished` (false: cut at max_new_tokens; absent or
null: unknown, as in UltraFeedback's own records).
Ratings scale: 1..5.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeline.data.formats.common import bad, completion, excerpt, iter_records, make_row, rating, require

RATING_RANGE = (1.0, 5.0)
_COMMON = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "5": 5.0, "N/A": None}  # nearly every rating: skip parsing


def _aspect_rating(value: Any, aspect: str, path: str, where: int, source: str) -> float | None:
    if type(value) is dict:
        r = value.get("Rating")
        if type(r) is str and r in _COMMON:
            return _COMMON[r]
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        if not isinstance(item, dict) or "Rating" not in item:
            raise bad(path, where, "annotation shape", f"{aspect} must be an object with a 'Rating': "
                      f"{excerpt(item)}", source)
        r = rating(item["Rating"], aspect, path, where, source)
        if r is not None:
            found.append(r)
    return sum(found) / len(found) if found else None


def read(path: str, source_cfg: Any, exclude: Any = None) -> Iterator[dict]:
    name = source_cfg.name
    for where, rec in iter_records(path, source_cfg, exclude):
        instruction = require(rec, "instruction", str, path, where, name)
        raw = require(rec, "completions", list, path, where, name)
        models = rec.get("models") if isinstance(rec.get("models"), list) else []
        completions = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict):
                raise bad(path, where, "value type", f"completions[{i}] must be an object, got "
                          f"{type(c).__name__}", name)
            response = require(c, "response", str, path, where, name)
            annotations = c.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise bad(path, where, "value type", f"completions[{i}].annotations must be an object: "
                          f"{excerpt(annotations)}", name)
            ratings = {a: _aspect_rating(v, a, path, where, name) for a, v in sorted(annotations.items())}
            model = c.get("model") if isinstance(c.get("model"), str) else None
            if model is None and i < len(models) and isinstance(models[i], str):
                model = models[i]
            finished = c.get("finished")
            if finished is not None and not isinstance(finished, bool):
                raise bad(path, where, "value type", f"completions[{i}].finished must be true, false or null: "
                          f"{excerpt(finished)}", name)
            completions.append(completion(response, model, ratings, finished))
        yield make_row(source_cfg, path, where, rec, [{"role": "user", "content": instruction}], completions)
