"""How far to trust a judge: its agreement with human labels, and Cohen's kappa.

`openrelease judge-agreement FILE` (or `python -m pipeline.eval.judge_agreement FILE`) judges every
labelled pair in FILE in both orders with the judge configured in `evaluate.judge`, and prints the
agreement, Cohen's kappa over the labels A / B / tie (each with a bootstrap interval over pairs), the
agreement on pairs humans did not call a tie, and the judge's order consistency. Only pairs the judge
judged count: a pair with a blank answer is settled by `blank_rule` without the judge and reported
apart (`n_rule`, `rule_agreement`). Judgments are cached with the evaluate stage's (`paths.eval_cache`).
The report names the judge (`judge`, its id) and `template_sha256`, and is also written to
`<paths.reports>/judge_agreement/` where the model card shows it if, and only if, that judge and
template are the ones the evaluation used. The evaluate stage runs `human_agreement` on
`paths.judge_labels` itself, every run.

FILE is JSON lines in one of two shapes:
- `{"instruction" (or "prompt"): str, "response_a": str, "response_b": str, "label": "A" | "B" | "tie"}`;
- LMSYS human judgments (MT-Bench human judgments, Chatbot Arena conversations):
  `{"conversation_a": [messages], "conversation_b": [messages], "winner": "model_a" | "model_b" | "tie" | "tie (bothbad)"}`;
  the first user turn is the instruction and the first assistant turn of each side its response.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import iter_jsonl
from pipeline.eval.cache import EvalCache
from pipeline.eval.judges import Judge, Template, judge_pairs, verdict
from pipeline.eval.stats import agreement_ci, order_consistency, pair_scores

_WINNERS = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (bothbad)": "tie"}


def _first(messages: Any, role: str, path: Path, line: int, key: str) -> str:
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str):
                return m["content"]
    raise DataError(path, line, f"{key} has a {role} turn", f"no {role} message with string content")


def read_labeled_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of {instruction, response_a, response_b, label, line} (and `id` when the row has a string
    one); a bad row is a DataError with file:line."""
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
                         "label": _WINNERS[winner], "line": line})
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
                     "response_b": obj["response_b"], "label": label, "line": line,
                     **({"id": obj["id"]} if isinstance(obj.get("id"), str) else {})})
    if not rows:
        raise DataError(path, None, "non-empty", "the file has no labelled pairs")
    return rows


def judge_table(judge: Judge, template: Template, rows: list[dict[str, Any]], cache: EvalCache) -> Any:
    """One row per labelled pair: the judge's P(response_a better) in both orders, its verdict, and
    whether the pair was settled by `blank_rule` instead of the judge."""
    import pandas as pd

    outcome: dict[str, Any] = {}
    probs = judge_pairs(judge, template, [(r["instruction"], r["response_a"], r["response_b"]) for r in rows],
                        cache, outcome=outcome)
    first, second = [p for p, _ in probs], [q for _, q in probs]
    scores = pair_scores(first, second)
    verdicts = [verdict(s) for s in scores]
    table = pd.DataFrame({"line": [r.get("line") for r in rows], "id": [r.get("id", "") for r in rows],
                          "label": [r["label"] for r in rows], "p_a_shown_first": first,
                          "p_a_shown_second": second, "score": scores, "verdict": verdicts,
                          "agree": [v == r["label"] for v, r in zip(verdicts, rows, strict=True)],
                          "by_rule": outcome["by_rule"]})
    table.attrs["unparsed"] = outcome["unparsed"]
    return table


def summarize(table: Any, *, min_units: int, ci: dict[str, Any] | None = None) -> dict[str, Any]:
    """Agreement and kappa (with intervals) and order consistency over the pairs the judge judged;
    the pairs settled by rule are counted apart, with how often the rule matched the people."""
    judged, ruled = table[~table["by_rule"]], table[table["by_rule"]]
    stats: dict[str, Any] = agreement_ci(list(judged["label"]), list(judged["verdict"]), min_units=min_units,
                                         **(ci or {}))
    stats["order_consistency"] = order_consistency(list(judged["p_a_shown_first"]), list(judged["p_a_shown_second"]))
    stats["n_rule"] = len(ruled)
    stats["rule_agreement"] = float(ruled["agree"].mean()) if len(ruled) else float("nan")
    stats["n_pairs"] = len(table)
    stats["unparsed"] = int(table.attrs.get("unparsed", 0))
    return stats


def kappa_reliable(stats: dict[str, Any], min_units: int = 10) -> bool:
    """A judge is worth a say only if Cohen's kappa's interval lies above 0: one that includes 0 (or
    none at all, NaN) does not tell the judge from chance. The one exception is a judge that agreed
    with people on every one of at least `min_units` judged pairs (kappa 1): no resample differs, so
    there is no interval, but there is no doubt either."""
    lo = stats.get("kappa_ci_low")
    if isinstance(lo, float) and math.isfinite(lo):
        return lo > 0
    return stats.get("kappa") == 1.0 and stats.get("agreement") == 1.0 and (stats.get("n") or 0) >= min_units


def agreement(judge: Judge, template: Template, rows: list[dict[str, Any]], cache: EvalCache, *,
              min_units: int = 10, ci: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge each labelled pair in both orders; compare the judge's A/B/tie verdicts with the labels."""
    stats = summarize(judge_table(judge, template, rows, cache), min_units=min_units, ci=ci)
    stats["reliable"] = kappa_reliable(stats, min_units)
    stats["judge"] = judge.id
    stats["template_sha256"] = template.sha256
    if getattr(judge, "snapshot", None):
        stats["snapshot"] = judge.snapshot  # the remote model version that answered
    return stats


def human_agreement(judge: Judge, template: Template, labels: str | Path, cache: EvalCache, ci: dict[str, Any],
                    *, min_units: int) -> tuple[dict[str, float], Any]:
    """The evaluate stage's check of its judge against people on `paths.judge_labels`: flat metrics
    `judge_human_*` and the per-pair table (written as judge_human.parquet)."""
    table = judge_table(judge, template, read_labeled_pairs(labels), cache)
    s = summarize(table, min_units=min_units, ci=ci)
    m: dict[str, float] = {}
    for key in ("agreement", "kappa"):
        for suffix in ("", "_ci_low", "_ci_high"):
            m[f"judge_human_{key}{suffix}"] = s[f"{key}{suffix}"]
    m.update({"judge_human_n_judged": s["n"], "judge_human_n_rule": s["n_rule"],
              "judge_human_order_consistency": s["order_consistency"], "judge_human_unparsed": s["unparsed"],
              "judge_human_reliable": int(kappa_reliable(s, min_units))})
    return m, table


def _cmd(args: argparse.Namespace) -> int:
    from pipeline.core.io import atomic_write_json
    from pipeline.core.lineage import sha256_json, sha256_path
    from pipeline.core.params import load_params
    from pipeline.core.shared import ENV_EVAL_CACHE_DIR, shared_cache_dir
    from pipeline.eval.judges import JUDGES, template_for
    from pipeline.eval.measures import Models

    params = load_params(args.params)
    root = Path(args.params).resolve().parent
    rows = read_labeled_pairs(args.file)[: args.limit]
    jp, b = params.evaluate.judge, params.evaluate.bootstrap
    # built as the evaluate stage builds it, so the judge id (and each cached judgment) is the stage's
    models = Models()
    judge = JUDGES[jp.kind](jp, default_model=root / params.paths.base_model, sha256_of=models.sha256,
                            loader=models.load)
    template = template_for(root / params.paths.judge_template, jp)
    ci = {"n_resamples": b.n_resamples, "confidence_level": b.confidence_level, "seed": b.seed}
    cache = EvalCache(shared_cache_dir(root, params.paths.eval_cache, env=ENV_EVAL_CACHE_DIR))
    stats = agreement(judge, template, rows, cache, min_units=b.min_clusters, ci=ci)
    stats.update(file=args.file, file_sha256=sha256_path(Path(args.file)), limit=args.limit)
    # JSON has no NaN (no interval, undefined kappa): null, as in metrics/eval.json
    stats = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
    if not args.no_report:
        # one report per (file, judge, template, limit): another judge's figures never overwrite these,
        # and the card shows only the reports of the judge and template the evaluation used
        key = sha256_json({k: stats[k] for k in ("file_sha256", "judge", "template_sha256", "limit")})[:12]
        out = Path(args.out) if args.out else root / params.paths.reports / "judge_agreement" / f"{Path(args.file).stem}-{key}.json"
        atomic_write_json(out, stats)
        print(f"report: {out}", file=sys.stderr)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("judge-agreement", help="agreement and Cohen's kappa of the configured judge with human labels")
    p.add_argument("file", help="JSONL of labelled pairs (see pipeline/eval/judge_agreement.py)")
    p.add_argument("--params", default="params.yaml", help="params file whose evaluate.judge is used")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--out", default=None, help="write the report here; default: <paths.reports>/judge_agreement/"
                   "<file stem>-<hash of file, judge, template, limit>.json, which the model card shows when its "
                   "judge and template are the ones the evaluation used")
    p.add_argument("--no-report", action="store_true", help="print the result only; write no report")
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
