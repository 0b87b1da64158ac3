"""Compatibility for `pipeline.stages.evaluate` until it moves to `pipeline.constraints.ifeval`.

The project's ad-hoc constraint types are gone; prompts carry IFEval ids (`pipeline.constraints.prompts`).
This keeps the two names evaluate imports working on the new files: `read_prompts` adds a derived
`constraints` list (`{"type": <IFEval id>, **kwargs}`), and `check` scores one response against it
with IFEval's strict rule. Delete this module when nothing imports it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.constraints import prompts
from pipeline.constraints.ifeval import follows


def read_prompts(path: str | Path) -> list[dict]:
    rows = prompts.read_prompts(path)
    for r in rows:
        r["constraints"] = [{"type": i, **k} for i, k in zip(r["instruction_id_list"], r["kwargs"], strict=True)]
    return rows


def check(response: str, constraints: list[dict]) -> list[dict]:
    out = []
    for c in constraints:
        kwargs = {k: v for k, v in c.items() if k != "type"}
        ok = follows(c["type"], kwargs, "", response)
        out.append({"type": c["type"], "ok": ok, "detail": "followed" if ok else "not followed"})
    return out
