"""Stage `evaluate`: the trained model against its reference (the base model) on data neither saw.

Reads:  `paths.model` (trained), `paths.base_model` (reference), `paths.dataset/test.parquet`,
        `paths.eval_prompts` (held-out constraint prompts), `paths.general_prompts` and
        `paths.judge_template`; params `evaluate` and `train.dpo` (beta and max_length, so the implicit
        reward is the one training optimised); `paths.runs/train.json` `mlflow_model_id`
        when present (the MLflow LoggedModel the metrics are attached to).
Writes: `paths.metrics/eval.json` (flat DVC metrics), `paths.eval_dir/{preference,constraints,general}.parquet`
        (one row per test pair / prompt), `paths.plots/eval_pass_rates.png`, `paths.plots/eval_win_rate.png`,
        and the cache `paths.eval_cache` (DVC `persist: true`).
Run:    `dvc repro evaluate` (or `python -m pipeline.stages.evaluate`).

What is measured:
1. Held-out preference accuracy: the implicit DPO reward r = beta * (log p_policy - log p_ref) of the
   chosen and the rejected completion, log-probs summed over completion tokens (tokenized as TRL
   does, truncated at train's max_length keeping the start); accuracy = fraction with
   r_chosen > r_rejected (a tie is not a win, as in TRL's rewards/accuracies), margin =
   mean(r_chosen - r_rejected). Pairs with no completion token left after truncation are counted
   (`pref_n_truncated_away`) and left out, as TRL leaves them out of training.
2. Verifiable instruction following: greedy responses of both models to the held-out constraint
   prompts, checked by `pipeline.constraints.checkers.check`. Prompt-level pass = every constraint holds;
   constraint-level = pooled fraction of constraints that hold. Deltas (policy - base) get a paired
   bootstrap interval that resamples prompts.
3. Judged win rate on the general prompts: each (policy, base) pair judged in both orders; a pair
   judged differently in the two orders is a tie; ties count half. Length-controlled win rate:
   see `pipeline.eval.stats.lc_win_rate`. `judge_order_consistency` (the share of pairs the judge
   decides the same way in both orders) says how much the judge's verdicts are worth: a judge that
   always picks one position scores 0 there, and its win rate is 0.5 by construction.
4. Length and drift: mean response length in tokens of each model over all evaluation prompts, their
   ratio, and `kl`, an estimate of KL(policy || base). Along each of the policy's greedy responses,
   the exact next-token KL over the whole vocabulary is computed at every completion position (given
   the prefix so far) and summed. By the chain rule, the expectation of this sum over responses
   *sampled* from the policy is exactly the sequence-level KL, so averaging it over sampled responses
   would be an unbiased, lower-variance (Rao-Blackwellised) version of the usual mean of
   log p_policy - log p_ref. Greedy responses are used instead (no extra generation, deterministic),
   so `kl` is the KL accumulated along the policy's most likely responses, a proxy for the expected
   sequence KL rather than an unbiased estimate of it. `kl` is in nats per response; `kl_per_token`
   divides by the tokens scored. Identical models give exactly 0.

Every model output (generation, log-prob, KL, judgment) is cached under a key naming the model
sha256, the prompt hash, the decoding params, the judge id and the template hash; with a warm cache
no model is even loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import SourceError
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.params import EvaluateParams
from pipeline.core.stage import StageContext, stage_main
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, generations, kls, logps, read_general_prompts, read_test_pairs
from pipeline.eval.stats import (
    lc_win_rate,
    mean_diff,
    mean_stat,
    order_score,
    pair_scores,
    paired_bootstrap_ci,
    pooled_rate_diff,
)

STAGE = "evaluate"
READS = ["evaluate", "train.dpo", "paths.base_model", "paths.model", "paths.dataset", "paths.eval_prompts",
         "paths.general_prompts", "paths.judge_template", "paths.eval_dir", "paths.eval_cache",
         "paths.metrics", "paths.plots"]
TEST_SPLIT = "test.parquet"  # the file `build` writes in paths.dataset (data contract)
METRICS_FILE = "eval.json"

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    base: Path
    policy: Path
    test: Path
    eval_prompts: Path
    general_prompts: Path
    judge_template: Path
    beta: float
    max_length: int | None


@dataclass
class Result:
    metrics: dict[str, float]
    tables: dict[str, Any] = field(default_factory=dict)  # name -> pandas DataFrame
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (MLflow only, not DVC metrics)


def _ci(prefix: str, est_lo_hi: tuple[float, float, float], metrics: dict[str, float]) -> None:
    est, lo, hi = est_lo_hi
    metrics.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def preference(models: Models, inp: Inputs, p: EvaluateParams, cache: EvalCache, ci: dict) -> tuple[dict, Any]:
    """Implicit-reward accuracy and margin on the held-out test pairs."""
    import pandas as pd

    pairs = read_test_pairs(inp.test, p.pref_max_pairs)
    comp = [(r["prompt"], r[k]) for r in pairs for k in ("chosen", "rejected")]
    pol = np.array(logps(models, inp.policy, comp, p, inp.max_length, cache, "logp policy"))
    ref = np.array(logps(models, inp.base, comp, p, inp.max_length, cache, "logp reference"))
    lp_pol, lp_ref, n_tok = pol[:, 0], ref[:, 0], pol[:, 1]
    reward = inp.beta * (lp_pol - lp_ref)
    r_c, r_r = reward[0::2], reward[1::2]
    # Like TRL, leave out pairs whose prompt fills max_length (a completion with no tokens left has
    # no reward); they are counted, not silently dropped.
    scored = (n_tok[0::2] > 0) & (n_tok[1::2] > 0)
    correct = (r_c > r_r).astype(float)  # a tie is not a win, as in TRL's rewards/accuracies
    margin = r_c - r_r
    m: dict[str, float] = {"pref_n": int(scored.sum()), "pref_n_truncated_away": int((~scored).sum()),
                           "beta": inp.beta}
    if scored.any():
        m.update({"reward_margin": float(np.mean(margin[scored])), "reward_chosen": float(np.mean(r_c[scored])),
                  "reward_rejected": float(np.mean(r_r[scored]))})
        _ci("pref_accuracy", paired_bootstrap_ci((correct[scored],), mean_stat, **ci), m)
    else:
        log.warning("no test pair has completion tokens within max_length %s", inp.max_length)
        m.update(dict.fromkeys(["reward_margin", "reward_chosen", "reward_rejected", "pref_accuracy",
                                "pref_accuracy_ci_low", "pref_accuracy_ci_high"], float("nan")))
    table = pd.DataFrame({"id": [r["id"] for r in pairs],
                          "logp_policy_chosen": lp_pol[0::2], "logp_policy_rejected": lp_pol[1::2],
                          "logp_ref_chosen": lp_ref[0::2], "logp_ref_rejected": lp_ref[1::2],
                          "tokens_chosen": n_tok[0::2].astype(int), "tokens_rejected": n_tok[1::2].astype(int),
                          "reward_chosen": r_c, "reward_rejected": r_r, "margin": margin,
                          "correct": correct.astype(bool), "scored": scored})
    return m, table


def verifiable(rows: list[dict], resp_base: list[str], resp_pol: list[str], ci: dict) -> tuple[dict, Any]:
    """Prompt- and constraint-level pass rates of both models and their paired deltas."""
    import pandas as pd

    from pipeline.constraints.checkers import check

    res_b = [check(r, row["constraints"]) for r, row in zip(resp_base, rows, strict=True)]
    res_p = [check(r, row["constraints"]) for r, row in zip(resp_pol, rows, strict=True)]
    n = np.array([len(row["constraints"]) for row in rows], dtype=float)
    ok_b = np.array([sum(c["ok"] for c in r) for r in res_b], dtype=float)
    ok_p = np.array([sum(c["ok"] for c in r) for r in res_p], dtype=float)
    pass_b, pass_p = (ok_b == n).astype(float), (ok_p == n).astype(float)
    m: dict[str, float] = {"n_eval_prompts": len(rows), "n_constraints": int(n.sum())}
    _ci("pass_rate_base", paired_bootstrap_ci((pass_b,), mean_stat, **ci), m)
    _ci("pass_rate_policy", paired_bootstrap_ci((pass_p,), mean_stat, **ci), m)
    _ci("pass_rate_delta", paired_bootstrap_ci((pass_p, pass_b), mean_diff, **ci), m)
    m["constraint_pass_rate_base"] = float(ok_b.sum() / n.sum())
    m["constraint_pass_rate_policy"] = float(ok_p.sum() / n.sum())
    _ci("constraint_pass_rate_delta", paired_bootstrap_ci((ok_p, ok_b, n), pooled_rate_diff, **ci), m)
    table = pd.DataFrame({
        "id": [row["id"] for row in rows], "prompt": [row["prompt"] for row in rows],
        "constraints": [json.dumps(row["constraints"]) for row in rows],
        "response_base": resp_base, "response_policy": resp_pol,
        "pass_base": pass_b.astype(bool), "pass_policy": pass_p.astype(bool),
        "n_constraints": n.astype(int), "ok_base": ok_b.astype(int), "ok_policy": ok_p.astype(int),
        "checks_base": [json.dumps(r) for r in res_b], "checks_policy": [json.dumps(r) for r in res_p]})
    return m, table


def judged(p: EvaluateParams, general: list[dict], resp_base: list[str], resp_pol: list[str],
           len_base: np.ndarray, len_pol: np.ndarray, judge: Any, template: Any, cache: EvalCache,
           ci: dict) -> tuple[dict, Any]:
    """Win rate (both orders, ties half) and length-controlled win rate of the policy over the base."""
    import pandas as pd

    from pipeline.eval.judges import judge_pairs

    probs = judge_pairs(judge, template, [(g["prompt"], rp, rb) for g, rp, rb in
                                          zip(general, resp_pol, resp_base, strict=True)], cache)
    first, second = [a for a, _ in probs], [b for _, b in probs]
    scores = pair_scores(first, second)
    m: dict[str, float] = {"n_general_prompts": len(general)}
    _ci("win_rate", paired_bootstrap_ci((scores,), mean_stat, **ci), m)
    m["lc_win_rate"] = lc_win_rate(scores, len_pol - len_base, C=p.judge.lc_c)
    m["win_rate_soft"] = float(np.mean((np.array(first) + np.array(second)) / 2))
    m["n_wins"], m["n_ties"], m["n_losses"] = (int((scores > 0.5).sum()), int((scores == 0.5).sum()),
                                               int((scores < 0.5).sum()))
    # both orders name the same winner (ties aside, this is the judge's freedom from position bias)
    m["judge_order_consistency"] = float(np.mean([order_score(a) == order_score(b) for a, b in probs]))
    m["judge_unparsed"] = getattr(judge, "unparsed", 0)
    table = pd.DataFrame({"id": [g["id"] for g in general], "prompt": [g["prompt"] for g in general],
                          "response_base": resp_base, "response_policy": resp_pol,
                          "p_policy_shown_first": first, "p_policy_shown_second": second, "score": scores,
                          "len_base": len_base.astype(int), "len_policy": len_pol.astype(int)})
    return m, table


def run(p: EvaluateParams, inp: Inputs, cache: EvalCache, out_dir: Path, *, models: Models | None = None,
        generate_fn: Callable[..., list[list[str]]] | None = None, judge: Any = None) -> Result:
    """Evaluate `inp.policy` against `inp.base`; write per-prompt Parquet files into `out_dir`."""
    from pipeline.constraints.checkers import read_prompts
    from pipeline.eval.judges import JUDGES, load_template

    for folder, stage in ((inp.base, "base_model"), (inp.policy, "train")):
        if not any(Path(folder).glob("*.safetensors")):
            raise SourceError(f"{folder}: no safetensors model here (run `dvc repro {stage}`)")
    if generate_fn is None:
        from pipeline.lm.generation import generate as generate_fn
    models = models or Models()
    ci = {"n_resamples": p.bootstrap.n_resamples, "confidence_level": p.bootstrap.confidence_level,
          "seed": p.bootstrap.seed}
    template = load_template(inp.judge_template)
    rows = read_prompts(inp.eval_prompts)[: p.max_eval_prompts]
    general = read_general_prompts(inp.general_prompts, p.general)
    if judge is None:
        judge = JUDGES[p.judge.kind](p.judge, default_model=inp.base, sha256_of=models.sha256, loader=models.load)

    metrics, tables, timings = {}, {}, {}
    with _timed("preference", timings):
        m, tables["preference"] = preference(models, inp, p, cache, ci)
    metrics.update(m)

    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows + general]
    with _timed("generate_base", timings):
        resp_b = generations(models, inp.base, convs, p, cache, generate_fn, "evaluate: base")
    with _timed("generate_policy", timings):
        resp_p = generations(models, inp.policy, convs, p, cache, generate_fn, "evaluate: policy")
    k = len(rows)
    m, tables["constraints"] = verifiable(rows, resp_b[:k], resp_p[:k], ci)
    metrics.update(m)

    tok = models.tokenizer(inp.base)
    len_b = np.array([len(tok.encode(r, add_special_tokens=False)) for r in resp_b], dtype=float)
    len_p = np.array([len(tok.encode(r, add_special_tokens=False)) for r in resp_p], dtype=float)
    with _timed("judge", timings):
        m, tables["general"] = judged(p, general, resp_b[k:], resp_p[k:], len_b[k:], len_p[k:], judge,
                                      template, cache, ci)
    metrics.update(m)

    with _timed("kl", timings):
        kl = np.array(kls(models, inp.policy, inp.base, convs, resp_p, p, cache), dtype=float)
    metrics.update({"length_base": float(len_b.mean()), "length_policy": float(len_p.mean()),
                    "length_ratio": float(len_p.mean() / len_b.mean()) if len_b.mean() > 0 else float("nan"),
                    "kl": float(kl[:, 0].mean()),
                    "kl_per_token": float(kl[:, 0].sum() / kl[:, 1].sum()) if kl[:, 1].sum() > 0 else 0.0})
    tables["constraints"]["kl"] = kl[:k, 0]
    tables["general"]["kl"] = kl[k:, 0]
    for name, df in tables.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
    log.info("cache: %s", cache.stats())
    log.info("seconds per phase (wall/cpu): %s", timings)
    return Result(metrics=metrics, tables=tables, timings=timings)


@contextlib.contextmanager
def _timed(name: str, into: dict[str, float]):
    """Wall and process CPU seconds of a phase (CPU time tells load from work on a shared machine)."""
    w, c = time.perf_counter(), time.process_time()
    yield
    into[f"time_{name}_s"] = round(time.perf_counter() - w, 2)
    into[f"cpu_{name}_s"] = round(time.process_time() - c, 2)


def dpo_setting(dpo: dict[str, Any], name: str) -> Any:
    """A DPO hyperparameter from `train.dpo`, or trl.DPOConfig's default when train leaves it unset."""
    if name in dpo:
        return dpo[name]
    from trl import DPOConfig

    return DPOConfig.__dataclass_fields__[name].default


def _logged_model_id(runs_dir: Path, lineage_dir: Path) -> str | None:
    """The trained model's MLflow LoggedModel id from `train`'s run record (`mlflow_model_id`), when that
    record belongs to the train lineage record on disk (a run id is no DVC output)."""
    from pipeline.core.runs import read_run_records

    found, _ = read_run_records(runs_dir, lineage_dir, ["train"])
    return (found.get("train") or {}).get("mlflow_model_id")


def _body(ctx: StageContext) -> None:
    from pipeline.core import tracking
    from pipeline.eval.plots import write_plots

    P = ctx.params
    test = ctx.path("dataset") / TEST_SPLIT
    inp = Inputs(base=ctx.path("base_model"), policy=ctx.path("model"), test=test,
                 eval_prompts=ctx.path("eval_prompts"), general_prompts=ctx.path("general_prompts"),
                 judge_template=ctx.path("judge_template"), beta=float(dpo_setting(P.train.dpo, "beta")),
                 max_length=dpo_setting(P.train.dpo, "max_length"))
    models = Models()
    for path in (inp.base, inp.policy):
        models.known(path, ctx.add_input(path, log_dataset=False).sha256)  # hash each model folder once
    from pipeline.lm.template import check_template

    for path, what in ((inp.base, "evaluate (base model)"), (inp.policy, "evaluate (trained model)")):
        ctx.record.extra["chat_template_sha256"] = check_template(models.tokenizer(path), inp.base, what)
    test_art = ctx.add_input(test, name="test split")
    for path in (inp.eval_prompts, inp.general_prompts, inp.judge_template):
        ctx.add_input(path)
    cache = EvalCache(ctx.path("eval_cache"))
    out = ctx.path("eval_dir")
    with atomic_dir(out) as tmp:
        result = run(P.evaluate, inp, cache, tmp, models=models)
    ctx.add_output(out)
    metrics_path = ctx.path("metrics") / METRICS_FILE
    # JSON has no NaN (e.g. kappa-like stats on degenerate data): write null so every reader parses it
    atomic_write_json(metrics_path, {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in result.metrics.items()})
    ctx.add_output(metrics_path)
    for png in write_plots(result.metrics, ctx.path("plots")):
        ctx.add_output(png)
        ctx.run.log_artifact(png, artifact_path="plots")
    ctx.log_metrics(result.metrics)
    ctx.run.log_metrics({**cache.stats(), **result.timings})
    ctx.run.log_artifact(out, artifact_path="eval")
    ctx.run_facts["cache"] = cache.stats()   # hits depend on what earlier runs left: not a DVC output
    model_id = _logged_model_id(ctx.path("runs"), ctx.path("lineage"))
    if model_id and tracking.log_model_metrics(model_id, result.metrics, dataset=(test, test_art.sha256)):
        ctx.run_facts["logged_model_id"] = model_id
    elif not model_id:
        log.info("no LoggedModel id in %s/train.json: metrics are on the evaluate run only", P.paths.runs)


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
