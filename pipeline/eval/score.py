"""`openrelease score --responses FILE --out DIR`: score any model's answers by the headline's rules.

FILE is IFEval's response format, JSON lines with `prompt` and `response` (and optionally `finished`:
false when the generator cut the answer at its token limit, true when it ended by itself). Each line
is matched by its prompt text to the configured test prompts (`paths.test_prompts`, or `--prompts`),
and the answers are scored exactly as evaluate's headline scores a model
(`pipeline.eval.verifiable.score_set`): the validity rule of params `validity` (empty, too short,
looping, prompt-copying, reused across prompts, cut), then IFEval's strict checkers. Without
`finished`, a cut is judged by the text (the `unfinished` rule).

Writes `DIR/score.json` (pass rate with its bootstrap interval, the share of valid answers, failures
per rule, IFEval's reference prompt-level strict accuracy, counts, the prompt file's sha256 and the
rules) and `DIR/per_prompt.jsonl` (one verdict per prompt), and prints one summary line. A test prompt
with no answer in FILE is an error naming the count and the first one, unless `--allow-missing`
counts it as a failed (empty) answer.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError


def read_answers(path: str | Path) -> dict[str, tuple[str, bool | None]]:
    """prompt -> (response, finished) from FILE; a bad line is a DataError with file:line."""
    from pipeline.core.io import iter_jsonl

    out: dict[str, tuple[str, bool | None]] = {}
    first: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        prompt, response, finished = obj.get("prompt"), obj.get("response"), obj.get("finished")
        if not isinstance(prompt, str):
            raise DataError(path, lineno, "prompt", f"must be a string, got {prompt!r:.60}")
        if not isinstance(response, str):
            raise DataError(path, lineno, "response", f"must be a string (may be empty), got {response!r:.60}")
        if finished is not None and not isinstance(finished, bool):
            raise DataError(path, lineno, "finished", f"must be true, false or absent, got {finished!r:.60}")
        if prompt in out and out[prompt] != (response, finished):
            raise DataError(path, lineno, "one response per prompt",
                            f"this prompt already has another response on line {first[prompt]}")
        out[prompt] = (response, finished)
        first.setdefault(prompt, lineno)
    return out


def score_file(responses: str | Path, prompts: str | Path, rules: Any, ci: dict,
               allow_missing: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """(score.json's content, per-prompt verdicts) for the answers in `responses`."""

    from pipeline.constraints.validity import RULES
    from pipeline.core.lineage import sha256_file
    from pipeline.eval.stats import mean_stat, paired_bootstrap_ci
    from pipeline.eval.verifiable import read_prompt_set, row_id, score_set

    rows = read_prompt_set(Path(prompts))
    answers = read_answers(responses)
    missing = [r["prompt"] for r in rows if r["prompt"] not in answers]
    if missing and not allow_missing:
        raise DataError(responses, None, "an answer for every test prompt",
                        f"{len(missing)} of {len(rows)} prompts of {prompts} have no line; the first: "
                        f"{missing[0][:100]!r} (--allow-missing counts them as failed answers)")
    texts = [answers.get(r["prompt"], ("", None))[0] for r in rows]
    fins = [answers.get(r["prompt"], ("", None))[1] for r in rows]
    s = score_set(rows, texts, fins, rules)
    est, lo, hi = paired_bootstrap_ci((s.passed.astype(float),), mean_stat, **ci)
    failures = s.rule_failures()
    result = {
        "pass_rate": est, "pass_rate_ci_low": lo, "pass_rate_ci_high": hi,
        "valid_share": float(s.valid.mean()),
        "failures": {r: failures[r] for r in RULES},
        "ifeval_prompt_strict": float(s.strict.mean()),  # IFEval's reference semantics, no validity rule
        "n_prompts": len(rows), "n_missing": len(missing),
        "n_unmatched_lines": len(set(answers) - {r["prompt"] for r in rows}),
        "prompts_file": str(prompts), "prompts_sha256": sha256_file(Path(prompts)),
        "responses_sha256": sha256_file(Path(responses)),
        "rules": rules.__dict__ if hasattr(rules, "__dict__") else dict(rules),
    }
    per_prompt = [{"id": row_id(r), "prompt": r["prompt"], "response": t, "missing": r["prompt"] not in answers,
                   "valid": bool(v.valid), "failed": v.failed, "follow_strict": f, "pass": bool(p)}
                  for r, t, v, f, p in zip(rows, texts, s.verdicts, s.follow, s.passed, strict=True)]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}, per_prompt


def _cmd_score(args: argparse.Namespace) -> int:
    from pipeline.constraints.validity import Rules
    from pipeline.core.io import atomic_write_json, atomic_write_jsonl
    from pipeline.core.params import load_params

    P = load_params(args.params)
    prompts = Path(args.prompts or P.paths.test_prompts)
    b = P.evaluate.bootstrap
    ci = {"n_resamples": b.n_resamples, "confidence_level": b.confidence_level, "seed": b.seed}
    result, per_prompt = score_file(args.responses, prompts, Rules.of(P.validity), ci, args.allow_missing)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "per_prompt.jsonl", per_prompt)
    atomic_write_json(out / "score.json", result)
    broken = ", ".join(f"{r} {n}" for r, n in result["failures"].items() if n) or "none"
    ci_text = (f" [{result['pass_rate_ci_low']:.3f}, {result['pass_rate_ci_high']:.3f}]"
               if result["pass_rate_ci_low"] is not None else "")
    print(f"{args.responses}: pass_rate {result['pass_rate']:.3f}{ci_text} on {result['n_prompts']} prompts "
          f"({result['n_missing']} missing); valid {result['valid_share']:.3f}; failed rules: {broken}; "
          f"IFEval strict (no validity rule) {result['ifeval_prompt_strict']:.3f} -> {out / 'score.json'}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("score", help="score answers (JSONL prompt/response) by evaluate's headline rules")
    p.add_argument("--responses", required=True, help="JSON lines with prompt, response and optionally finished")
    p.add_argument("--out", required=True, help="folder for score.json and per_prompt.jsonl")
    p.add_argument("--prompts", help="prompt file to match (default: paths.test_prompts of --params)")
    p.add_argument("--params", default="params.yaml", help="params file with the validity rules")
    p.add_argument("--allow-missing", action="store_true", help="count test prompts without an answer as failed")
    p.set_defaults(func=_cmd_score)
