"""Stage `rate`: score every sampled completion with the IFEval checkers; write UltraFeedback rows.

Reads:  `paths.generations` (written by `generate`), params `rate`.
Writes: `paths.rated` (JSONL, one row per prompt in the `openbmb/UltraFeedback` layout),
        `paths.metrics`/rate.json and `paths.lineage`/rate.json.
Run:    `dvc repro rate` (or `python -m pipeline.stages.rate`).

Row layout, following openbmb/UltraFeedback (github.com/OpenBMB/UltraFeedback, "Dataset Format"):

    {"source": <params rate.source>, "instruction": <the user prompt>,
     "models": [<generator>, ...],                 # one entry per completion, in completion order
     "correct_answers": ["None"], "incorrect_answers": ["None"],   # as UltraFeedback outside TruthfulQA/FLAN
     "completions": [
       {"model": <generator>, "principle": null, "custom_system_prompt": null,   # no principle prompt used
        "response": <completion text>,
        "annotations": {
          "instruction_following": {"Rating": "1".."5", "Rationale": <which constraints were met>},
          "honesty":      {"Rating": "N/A", "Rationale": <why not rated>},
          "truthfulness": {"Type": ["None"], "Rationale": ..., "Rating": "N/A", "Rationale For Rating": ...},
          "helpfulness":  {"Type": ["None"], "Rationale": ..., "Rating": "N/A", "Rationale For Rating": ...}},
        "critique": <the per-constraint verdicts in words>,
        "fine-grained_score": <mean of the non-N/A ratings, i.e. the instruction_following rating, float>,
        "overall_score": null,                       # UltraFeedback's GPT-4 critique score: not produced here
        # extra fields (not in UltraFeedback), for audit:
        "constraint_results": [{"instruction_id", "ok", "detail"}, ...], "pass_fraction": float, "completion_index": int,
        "finished": bool (false: cut at max_new_tokens) or null when unknown}],
     # extra top-level fields: "id" (prompt id), "instruction_id_list", "kwargs", "prompt_line", "decoding"}

Only instruction following is verified, so only it gets a number: Rating = 1 + round_half_up(4 * f),
where f is the fraction of the prompt's IFEval instructions the completion follows, judged by
`pipeline.constraints.ifeval` with IFEval's strict rule (0 -> "1", 1/3 -> "2", 1/2 -> "3", 2/3 -> "4",
1 -> "5"). Honesty, truthfulness and helpfulness are "N/A" (UltraFeedback's own marker for an aspect
that was not rated), never an invented number; `overall_score` is null for the same reason.

A degenerate completion (params `validity`, `pipeline.constraints.validity`: empty, too short,
looping, copying the prompt, or one answer reused across prompts) is credited with no instruction:
rating 1, the lowest, so it is never the chosen reply of a pair, only a rejected one. These are the
rules that make an answer fail evaluate's headline, so DPO is not paid for what the headline refuses.
metrics/rate.json counts degenerate completions per rule.

A completion cut at `generate.max_new_tokens` (`finished` false; when the generator did not say, the
`validity` text rule decides) is rated by `rate.unfinished`: `invalid` credits it with nothing, as
evaluate fails a cut answer; `fail` credits it with no instruction that needs the whole answer (the
list and its rule: `pipeline.constraints.truncation`); `exclude` drops it. Either way metrics/rate.json
counts the cut completions, and under `exclude` the dropped completions and any prompt left without one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.constraints.ifeval import follow_list
from pipeline.constraints.prompts import instructions_problem
from pipeline.constraints.truncation import needs_whole_answer
from pipeline.constraints.validity import RULES, Rules, assess, required_texts
from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_json, atomic_write_jsonl, iter_jsonl
from pipeline.core.params import RateParams
from pipeline.core.rounds import ROUND_READS
from pipeline.core.stage import StageContext, stage_main

STAGE = "rate"
READS = ["rate", "validity", "paths.generations", "paths.rated", "paths.metrics"]
METRICS_FILE = "rate.json"
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
NOT_RATED = ("Not rated: the open-release default data path verifies only instruction following "
             "(with IFEval's deterministic instruction checkers); this aspect was not assessed.")

log = logging.getLogger(__name__)


def rating(fraction: float) -> int:
    """UltraFeedback-style 1..5 rating for the fraction of instructions followed (round half up)."""
    return 1 + math.floor(4 * fraction + 0.5)


def _not_rated(aspect: str) -> dict[str, Any]:
    if aspect == "honesty":
        return {"Rating": "N/A", "Rationale": NOT_RATED}
    return {"Type": ["None"], "Rationale": NOT_RATED, "Rating": "N/A", "Rationale For Rating": NOT_RATED}


def _verdicts(results: list[dict]) -> str:
    return "; ".join(f"{r['instruction_id']}: {r['detail']}" for r in results)


def judge(text: str, prompt: str, ids: list[str], kwargs: list[dict], finished: bool | None, unfinished: str,
          degenerate: list[str] | None = None) -> list[dict]:
    """Per instruction {"instruction_id", "ok", "detail"}: IFEval strict, with the degeneration and
    truncation rules."""
    if degenerate:
        why = f"not credited: degenerate ({', '.join(degenerate)})"
        return [{"instruction_id": iid, "ok": False, "detail": why} for iid in ids]
    if finished is False and unfinished == "invalid":
        return [{"instruction_id": iid, "ok": False, "detail": "not credited: cut at max_new_tokens"} for iid in ids]
    flags = follow_list(ids, kwargs, prompt, text)
    out = []
    for iid, kw, ok in zip(ids, kwargs, flags, strict=True):
        if finished is False and unfinished == "fail" and needs_whole_answer(iid, kw):
            out.append({"instruction_id": iid, "ok": False, "detail": "not credited: cut at max_new_tokens, needs the whole answer"})
        else:
            out.append({"instruction_id": iid, "ok": bool(ok), "detail": "followed" if ok else "not followed"})
    return out


def rate_completion(text: str, prompt: str, ids: list[str], kwargs: list[dict], model: str, index: int,
                    finished: bool | None = None, unfinished: str = "fail",
                    degenerate: list[str] | None = None) -> dict[str, Any]:
    """One UltraFeedback completion object for `text`, rated on the prompt's IFEval instructions;
    `degenerate` names the validity rules it breaks (then nothing is credited)."""
    results = judge(text, prompt, ids, kwargs, finished, unfinished, degenerate)
    met = sum(x["ok"] for x in results)
    frac = met / len(results)
    r = rating(frac)
    annotations = {a: _not_rated(a) for a in ASPECTS}
    annotations["instruction_following"] = {
        "Rating": str(r),
        "Rationale": f"Followed {met} of {len(results)} verifiable instructions: {_verdicts(results)}.",
    }
    return {
        "model": model, "principle": None, "custom_system_prompt": None, "response": text,
        "annotations": annotations,
        "critique": f"Checked by rule (IFEval, strict), not by a judge. {_verdicts(results)}.",
        "fine-grained_score": float(r), "overall_score": None,
        "constraint_results": results, "pass_fraction": frac, "completion_index": index, "finished": finished,
        "degenerate": list(degenerate or []),
    }


_REQUIRED = {"prompt_id": str, "messages": list, "instruction_id_list": list, "kwargs": list, "completion_index": int,
             "text": str, "generator": str}


def read_generations(path: str | Path) -> list[dict]:
    """Rows of a generations file; a missing key or wrong type is a DataError with file:line."""
    rows: list[dict] = []
    firsts: dict[str, tuple[int, list, tuple]] = {}
    seen: dict[tuple[str, int], int] = {}
    for lineno, obj in iter_jsonl(path):
        for key, kind in _REQUIRED.items():
            if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
                raise DataError(path, lineno, f"generation row key {key!r}", f"must be {kind.__name__}, got {obj.get(key)!r:.60}")
        msgs = obj["messages"]
        if not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs) or msgs[-1].get("role") != "user":
            raise DataError(path, lineno, "messages", "must be a list of {role, content} ending with a user turn")
        if problem := instructions_problem(obj["instruction_id_list"], obj["kwargs"]):
            raise DataError(path, lineno, "instructions", problem)
        if obj.get("finished") is not None and not isinstance(obj["finished"], bool):
            raise DataError(path, lineno, "generation row key 'finished'", f"must be true, false or absent, got {obj['finished']!r:.60}")
        pid, idx = obj["prompt_id"], obj["completion_index"]
        inst = (obj["instruction_id_list"], obj["kwargs"])
        first = firsts.setdefault(pid, (lineno, msgs, inst))
        if (first[1], first[2]) != (msgs, inst):
            raise DataError(path, lineno, "one prompt per id", f"{pid!r} has other messages or instructions than on line {first[0]}")
        if (pid, idx) in seen:
            raise DataError(path, lineno, "unique completion", f"{pid!r} completion {idx} already on line {seen[pid, idx]}")
        seen[pid, idx] = lineno
        rows.append({**obj, "line": lineno})
    return rows


def degeneration(generations: list[dict], rules: Rules) -> dict[int, tuple[list[str], bool | None]]:
    """Per generation (by position): the degeneration rules it breaks and whether it is cut (the
    generator's flag, or the validity text rule when the generator did not say). Reuse is counted
    across prompts of the whole file, never among one prompt's samples."""
    verdicts = assess([g["messages"][-1]["content"] for g in generations], [g["text"] for g in generations],
                      [g.get("finished") for g in generations], rules, [g["prompt_id"] for g in generations],
                      [required_texts(g["instruction_id_list"], g["kwargs"]) for g in generations])
    out = {}
    for i, (g, v) in enumerate(zip(generations, verdicts, strict=True)):
        cut = g.get("finished") is False or (g.get("finished") is None and "unfinished" in v.failed)
        out[i] = ([r for r in v.failed if r != "unfinished"], False if cut else g.get("finished"))
    return out


def run(p: RateParams, generations: list[dict], rules: Rules | None = None) -> tuple[list[dict], dict[str, float]]:
    """Group completions by prompt (file order), rate each; return UltraFeedback rows and flat metrics."""
    verdict = degeneration(generations, rules or Rules())
    groups: dict[str, list[dict]] = {}
    for i, g in enumerate(generations):
        degenerate, finished = verdict[i]
        groups.setdefault(g["prompt_id"], []).append({**g, "finished": finished, "degenerate": degenerate,
                                                      "finished_reported": g.get("finished")})
    rows: list[dict] = []
    id_total: Counter[str] = Counter()
    id_ok: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for pid, gs in groups.items():
        gs = sorted(gs, key=lambda g: g["completion_index"])
        counts["cut_completions"] += sum(g.get("finished") is False for g in gs)
        # the generator did not say (the validity text rule then decided, counted among the cut ones if cut)
        counts["finish_unknown_completions"] += sum(g["finished_reported"] is None for g in gs)
        first = gs[0]
        if p.unfinished == "exclude":
            kept = [g for g in gs if g.get("finished") is not False]
            counts["excluded_unfinished_completions"] += len(gs) - len(kept)
            if not kept:
                counts["prompts_left_without_completions"] += 1
                log.warning("rate: prompt %s has no finished completion; excluded (rate.unfinished: exclude)", pid)
                continue
            gs = kept
        prompt = first["messages"][-1]["content"]
        completions = [rate_completion(g["text"], prompt, g["instruction_id_list"], g["kwargs"], g["generator"],
                                       g["completion_index"], g.get("finished"), p.unfinished, g["degenerate"])
                       for g in gs]
        for c in completions:
            for res in c["constraint_results"]:
                id_total[res["instruction_id"]] += 1
                id_ok[res["instruction_id"]] += res["ok"]
        rows.append({
            "source": p.source, "instruction": prompt,
            "models": [c["model"] for c in completions],
            "correct_answers": ["None"], "incorrect_answers": ["None"],
            "completions": completions,
            "id": pid, "instruction_id_list": first["instruction_id_list"], "kwargs": first["kwargs"],
            "prompt_line": first.get("prompt_line"), "decoding": first.get("decoding"),
        })
    return rows, summarize(rows, id_total, id_ok, counts, len(groups))


def summarize(rows: list[dict], id_total: Counter, id_ok: Counter, counts: Counter, n_prompts_in: int) -> dict[str, float]:
    fracs = [[c["pass_fraction"] for c in r["completions"]] for r in rows]
    flat = [f for fs in fracs for f in fs]
    metrics: dict[str, float] = {
        "prompts": len(rows),
        "prompts_in": n_prompts_in,
        "completions": len(flat),
        "mean_pass_fraction": round(sum(flat) / len(flat), 4) if flat else 0.0,
        "all_constraints_met_rate": round(sum(f == 1.0 for f in flat) / len(flat), 4) if flat else 0.0,
        # A prompt with a completion meeting every constraint and one that does not: a clean DPO pair.
        "prompts_pass_and_fail": sum(max(fs) == 1.0 and min(fs) < 1.0 for fs in fracs),
        # A prompt whose completions got different ratings: `build` can pair them (margin permitting).
        "contrastive_prompts": sum(max(fs) > min(fs) for fs in fracs),
        "empty_completions": sum(not c["response"].strip() for r in rows for c in r["completions"]),
        # Cut at max_new_tokens, counted before the unfinished rule: rated as cut (fail) or dropped (exclude).
        "truncated_completions": counts["cut_completions"],
        "finish_unknown_completions": counts["finish_unknown_completions"],
        "excluded_unfinished_completions": counts["excluded_unfinished_completions"],
        "prompts_left_without_completions": counts["prompts_left_without_completions"],
        # never chosen: credited with nothing (pipeline.constraints.validity), counted per rule
        "degenerate_completions": sum(bool(c["degenerate"]) for r in rows for c in r["completions"]),
        # a prompt whose every completion is degenerate or cut can give no pair
        "prompts_without_valid_completion": sum(
            all(c["degenerate"] or c["finished"] is False for c in r["completions"]) for r in rows),
    }
    for rule in RULES:
        if rule != "unfinished":
            metrics[f"degenerate_{rule}"] = sum(rule in c["degenerate"] for r in rows for c in r["completions"])
    for t in sorted(id_total):
        metrics[f"pass_rate_{t.replace(':', '/')}"] = round(id_ok[t] / id_total[t], 4)
    return metrics


def _body(ctx: StageContext) -> None:
    src = ctx.path("generations")
    generations = read_generations(src)
    ctx.add_input(src, rows=len(generations), name="generations")
    rows, metrics = run(ctx.params.rate, generations, Rules.of(ctx.params.validity))
    out = ctx.path("rated")
    atomic_write_jsonl(out, rows)
    ctx.add_output(out, rows=len(rows))
    metrics_file = ctx.path("metrics") / METRICS_FILE
    atomic_write_json(metrics_file, metrics)
    ctx.add_output(metrics_file)
    ctx.log_metrics(metrics)
    log.info("rate: %d prompts, %d completions, mean pass fraction %.3f, %d contrastive prompts (%d pass-and-fail), "
             "%d degenerate completions", metrics["prompts"], metrics["completions"], metrics["mean_pass_fraction"],
             metrics["contrastive_prompts"], metrics["prompts_pass_and_fail"], metrics["degenerate_completions"])


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage rate_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "rate_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
