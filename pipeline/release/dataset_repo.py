"""The dataset repo's files beyond the pairs: the evaluation answers config and the prompt sets' splits.

`eval_answers` is the per-prompt evaluation of both models, one row per (prompt, model), from the
tables the evaluate stage writes into `paths.eval_dir` (`test`, `dev`, `ifeval`; one split each):

    prompt_id, prompt, instruction_id_list, kwargs (JSON text: its shape differs per instruction),
    model ("base" | "policy"), response, finished (false: cut at max_new_tokens),
    follow_strict (IFEval strict verdict per instruction, in instruction_id_list order), strict (all of them),
    valid (no degeneration rule broken), degenerate (the rules it broke, params `validity`), passed
    (strict and valid: the headline's prompt-level pass)

`prompt`, `response` and `finished` are what `openrelease score` reads (JSON lines), and `prompt`
and `response` what `openrelease ifeval` reads, so anyone can rescore the release from this config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError

EVAL_ANSWERS = "eval_answers"
# evaluate's per-prompt tables with instructions (general, panel, preference, judge_human are other shapes)
EVAL_ANSWER_UNITS = ("test", "dev", "ifeval")
MODELS = ("base", "policy")
# The split a prompt set's config publishes, by the role the prompts play (DESIGN.md: three roles).
PROMPT_SET_SPLITS = {"train_prompts": "train", "dev_prompts": "validation"}
UNIT_ROLES = {"test": "test prompts: the reported headline and the model-index",
              "dev": "dev prompts: what selection reads (sweeps, thresholds); never reported as a result",
              "ifeval": "the IFEval subset (paths.ifeval_prompts), IFEval's reference accuracies"}
EVAL_ANSWER_COLUMNS = ("prompt_id", "prompt", "instruction_id_list", "kwargs", "model", "response", "finished",
                       "follow_strict", "strict", "valid", "degenerate", "passed")


def prompt_set_split(name: str) -> str:
    return PROMPT_SET_SPLITS.get(name, "test")


def _json_list(value: Any, path: Path, row: int, column: str) -> list:
    try:
        out = json.loads(value) if isinstance(value, str) else list(value)
    except (ValueError, TypeError):
        out = None
    if not isinstance(out, list):
        raise DataError(path, row + 1, f"column {column} holds a JSON list", f"got {str(value)[:60]!r}")
    return out


def eval_answers_table(path: Path):
    """One evaluate table (`paths.eval_dir/<unit>.parquet`, wide: `*_base`, `*_policy`) in the long layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        wide = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, "readable Parquet", str(e).splitlines()[0]) from None
    need = {"id", "prompt", "instruction_id_list", "kwargs"} | {
        f"{c}_{m}" for m in MODELS for c in ("response", "finished", "follow_strict", "strict", "valid", "failed", "pass")}
    if wide and (missing := sorted(need - set(wide[0]))):
        raise DataError(path, None, "evaluate's per-prompt columns", f"missing {missing}")
    rows = []
    for i, r in enumerate(wide):
        ids = [str(x) for x in _json_list(r["instruction_id_list"], path, i, "instruction_id_list")]
        kwargs = r["kwargs"] if isinstance(r["kwargs"], str) else json.dumps(r["kwargs"])
        for m in MODELS:
            failed = r[f"failed_{m}"]
            rows.append({
                "prompt_id": str(r["id"]), "prompt": r["prompt"], "instruction_id_list": ids, "kwargs": kwargs,
                "model": m, "response": r[f"response_{m}"], "finished": r[f"finished_{m}"],
                "follow_strict": [bool(x) for x in _json_list(r[f"follow_strict_{m}"], path, i, f"follow_strict_{m}")],
                "strict": bool(r[f"strict_{m}"]), "valid": bool(r[f"valid_{m}"]),
                "degenerate": [x for x in (failed.split(",") if isinstance(failed, str) else failed or []) if x],
                "passed": bool(r[f"pass_{m}"])})
    schema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("instruction_id_list", pa.list_(pa.string())),
                        ("kwargs", pa.string()), ("model", pa.string()), ("response", pa.string()),
                        ("finished", pa.bool_()), ("follow_strict", pa.list_(pa.bool_())), ("strict", pa.bool_()),
                        ("valid", pa.bool_()), ("degenerate", pa.list_(pa.string())), ("passed", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def write_eval_answers(tables: dict[str, Path], dataset_dir: Path) -> dict[str, Path]:
    """`data/eval_answers/<unit>.parquet` for each evaluate table; returns unit -> written file."""
    import pyarrow.parquet as pq

    out = {}
    for unit, src in tables.items():
        dest = dataset_dir / "data" / EVAL_ANSWERS / f"{unit}.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(eval_answers_table(src), dest)
        out[unit] = dest
    return out
