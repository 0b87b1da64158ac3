"""`openrelease ifeval --input IN --responses RESP --out DIR`: IFEval's own evaluation, offline.

Writes `eval_results_strict.jsonl` and `eval_results_loose.jsonl` in IFEval's output format and
prints, for each, the reference's report (prompt-level and instruction-level accuracy, then per
category and per instruction id). Semantics: `pipeline.constraints.ifeval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUTPUTS = (("eval_results_strict", False), ("eval_results_loose", True))


def _cmd_ifeval(args: argparse.Namespace) -> int:
    from pipeline.constraints import ifeval

    inputs = ifeval.read_ifeval(args.input)
    responses = ifeval.read_responses(args.responses)
    strict, loose = ifeval.evaluate(inputs, responses, where=args.input)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unused = len(set(responses) - {r["prompt"] for r in inputs})
    for (name, _), outputs in zip(OUTPUTS, (strict, loose), strict=True):
        path = ifeval.write_results(out / f"{name}.jsonl", outputs)
        print("=" * 64)
        print(f"{path} Accuracy Scores:")
        print(ifeval.report(outputs))
    if unused:
        print(f"\nnote: {unused} response(s) in {args.responses} match no prompt of {args.input} (ignored, as IFEval does)")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("ifeval", help="score IFEval responses (strict and loose), as the reference does")
    p.add_argument("--input", required=True, help="IFEval input JSONL (key, prompt, instruction_id_list, kwargs)")
    p.add_argument("--responses", required=True, help="JSONL with prompt and response, matched to inputs by prompt")
    p.add_argument("--out", required=True, help="folder for eval_results_strict.jsonl and eval_results_loose.jsonl")
    p.set_defaults(func=_cmd_ifeval)
