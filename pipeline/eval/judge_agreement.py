"""How far to trust a judge: its agreement with human labels, and Cohen's kappa.

`openrelease judge-agreement FILE` (or `python -m pipeline.eval.judge_agreement FILE`) judges every
labelled pair in FILE in both orders with the judge configured in `evaluate.judge`, and prints the
agreement, Cohen's kappa over the labels A / B / tie, and the agreement on pairs humans did not call
a tie. Judgments are cached with the evaluate stage's (`paths.eval_cache`).

FILE is JSON lines in one of two shapes:
- `{"instruction" (or "prompt"): str, "response_a": str, "response_b": str, "label": "A" | "B" | "tie"}`;
- LMSYS human judgments (MT-Bench human judgments, Chatbot Arena conversations):
  `{"conversation_a": [messages], "conversation_b": [messages], "winner": "model_a" | "model_b" | "tie" | "tie (bothbad)"}`;
  the first user turn is the instruction and the first assistant turn of each side its response.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import iter_jsonl
from pipeline.eval.cache import EvalCache
from pipeline.eval.judges import Judge, Template, judge_pairs, verdict
from pipeline.eval.stats import agreement_stats, pair_scores

_WINNERS = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (bothbad)": "tie"}


def _first(messages: Any, role: str, path: Path, line: int, key: str) -> str:
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str):
                return m["content"]
    raise DataError(path, line, f"{key} has a {role} turn", f"no {role} message with string content")


def read_labeled_pairs(path: str | Path) -> list[dict[str, str]]:
    """Rows of {instruction, response_a, response_b, label}; a bad row is a DataError with file:line."""
    path = Path(path)
    rows = []
    for line, obj in iter_jsonl(path):
        if "conversation_a" in obj:
            winner = obj.get("winner")
            if winner not in _WINNERS:
                raise DataError(path, line, "winner", f"must be one of {sorted(_WINNERS)}, got {winner!r}")
            rows.append({"instruction": _first(obj["conversation_a"], "user", path, line, "conversation_a"),
                         "response_a": _first(obj["conversation_a"], "assistant", path, line, "conversation_a"),
                         "response_b": _first(obj.get("conversation_b"), "assistant", path, line, "conversation_b"),
                         "label": _WINNERS[winner]})
            continue
        instruction = obj.get("instruction", obj.get("prompt"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(path, line, "instruction", f"must be a non-blank string, got {instruction!r:.80}")
        for key in ("response_a", "response_b"):
            # a blank answer is real data (a model that said nothing): it is judged (it loses), not refused
            if not isinstance(obj.get(key), str):
                raise DataError(path, line, key, f"must be a string (blank allowed), got {obj.get(key)!r:.80}")
        label = obj.get("label")
        if label not in ("A", "B", "tie"):
            raise DataError(path, line, "label", f"must be 'A', 'B' or 'tie', got {label!r}")
        rows.append({"instruction": instruction, "response_a": obj["response_a"],
                     "response_b": obj["response_b"], "label": label})
    if not rows:
        raise DataError(path, None, "non-empty", "the file has no labelled pairs")
    return rows


def agreement(judge: Judge, template: Template, rows: list[dict[str, str]], cache: EvalCache) -> dict[str, Any]:
    """Judge each labelled pair in both orders; compare the judge's A/B/tie verdicts with the labels."""
    probs = judge_pairs(judge, template, [(r["instruction"], r["response_a"], r["response_b"]) for r in rows], cache)
    scores = pair_scores([p for p, _ in probs], [q for _, q in probs])
    judged = [verdict(s) for s in scores]
    stats = agreement_stats([r["label"] for r in rows], judged)
    stats["judge"] = judge.id
    stats["template_sha256"] = template.sha256
    stats["n_blank_pairs"] = sum(not r["response_a"].strip() or not r["response_b"].strip() for r in rows)
    return stats


def _cmd(args: argparse.Namespace) -> int:
    from pipeline.core.lineage import sha256_path
    from pipeline.core.params import load_params
    from pipeline.eval.judges import JUDGES, template_for
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    params = load_params(args.params)
    root = Path(args.params).resolve().parent
    rows = read_labeled_pairs(args.file)[: args.limit]
    jp = params.evaluate.judge
    judge = JUDGES[jp.kind](jp, default_model=root / params.paths.base_model, sha256_of=sha256_path,
                            loader=lambda d: (load_causal_lm(d), load_tokenizer(d)))
    template = template_for(root / params.paths.judge_template, jp)
    stats = agreement(judge, template, rows, EvalCache(root / params.paths.eval_cache))
    stats["file"] = args.file
    stats["file_sha256"] = sha256_path(Path(args.file))
    stats["limit"] = args.limit
    out = args.out
    if out is None and params.paths.judge_labels and \
            Path(args.file).resolve() == (root / params.paths.judge_labels).resolve():
        out = root / params.paths.reports / "judge_agreement.json"  # where the model card looks
    if out:
        from pipeline.core.io import atomic_write_json

        stats["file"] = params.paths.judge_labels if out != args.out else args.file
        atomic_write_json(Path(out), stats)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("judge-agreement", help="agreement and Cohen's kappa of the configured judge with human labels")
    p.add_argument("file", help="JSONL of labelled pairs (see pipeline/eval/judge_agreement.py)")
    p.add_argument("--params", default="params.yaml", help="params file whose evaluate.judge is used")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--out", default=None, help="also write the result as JSON here; default: "
                   "<paths.reports>/judge_agreement.json when FILE is paths.judge_labels (the card reads it)")
    p.set_defaults(func=_cmd)


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.errors import OpenReleaseError
    from pipeline.core.stage import configure_logging

    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.judge_agreement")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["judge-agreement", *(sys.argv[1:] if argv is None else argv)])
    configure_logging()
    try:
        return args.func(args)
    except OpenReleaseError as e:
        print(f"judge-agreement: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
