"""Stage `evaluate`: the trained model against its reference (the base model) on data neither saw.

Reads:  `paths.model` (trained), `paths.base_model` (reference), `paths.dataset/test.parquet`,
        `paths.eval_prompts` (held-out constraint prompts, the project's format or IFEval's),
        `paths.ifeval_prompts` (the IFEval subset), `paths.train_prompts` (which instruction ids
        training saw), `paths.general_prompts` and
        `paths.judge_template`; params `evaluate` and `train.dpo` (beta and max_length, so the implicit
        reward is the one training optimised); `paths.runs/train.json` `mlflow_model_id`
        when present (the MLflow LoggedModel the metrics are attached to).
Writes: `paths.metrics/eval.json` (flat DVC metrics), `paths.eval_dir/{preference,constraints,ifeval,general}.parquet`
        (one row per test pair / prompt), `paths.plots/eval_pass_rates.png`, `paths.plots/eval_win_rate.png`,
        and the cache `paths.eval_cache` (DVC `persist: true`).
Run:    `dvc repro evaluate` (or `python -m pipeline.stages.evaluate`).

What is measured:
1. Held-out preference accuracy: the implicit DPO reward r = beta * (log p_policy - log p_ref) of the
   chosen and the rejected completion, log-probs summed over completion tokens (tokenized as TRL
   does, truncated at train's max_length keeping the start); accuracy = fraction with
   r_chosen > r_rejected (a tie is not a win, as in TRL's rewards/accuracies), margin =
   mean(r_chosen - r_rejected). Pairs with no completion token left after truncation are counted
   (`pref_n_truncated_away`) and left out, as TRL leaves them out of training. Several pairs can
   come from one prompt, so the interval is a cluster bootstrap over prompts (`pref_n_prompts`);
   with fewer than `bootstrap.min_clusters` prompts no interval is reported (NaN), never [1, 1].
2. Verifiable instruction following (`pipeline.eval.verifiable`, `pipeline.eval.ifeval_eval`): greedy
   responses of both models to the held-out constraint prompts and to the IFEval subset. The
   validity rule: an empty response, or one cut at max_new_tokens, is a failed answer, so
   `pass_rate_*` (the headline) cannot be gamed by saying less; `empty_rate_*` and
   `unfinished_rate_*` give the share of such responses per model over every evaluation prompt.
   IFEval is scored with its reference semantics (strict and loose, prompt- and instruction-level;
   comparable with published numbers) and, separately, with the validity rule; instruction ids the
   training prompts never use are reported apart (`ifeval_heldout_*` vs `ifeval_indist_*`). When
   `paths.eval_prompts` is itself in IFEval's format the headline is its IFEval prompt-level
   strict accuracy with the validity rule.
3. Judged win rate on the general prompts: each (policy, base) pair judged in both orders; a pair
   judged differently in the two orders is a tie; ties count half; a blank answer loses without
   the judge. Length-controlled win rate: AlpacaEval 2's GLM (`pipeline.eval.lc`) with its standard
   error and a bootstrap interval. `judge_order_consistency` (the share of pairs the judge
   decides the same way in both orders) says how much the judge's verdicts are worth: below
   `judge.min_order_consistency` `judge_reliable` is 0 and the release leaves its win rates out of
   the model-index and of every gate.
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
from pipeline.core.shared import ENV_EVAL_CACHE_DIR, shared_cache_dir
from pipeline.core.stage import StageContext, stage_main
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, generations, kls, logps, read_general_prompts, read_test_pairs
from pipeline.eval.stats import (
    cluster_bootstrap_ci,
    mean_stat,
    order_score,
    pair_scores,
    paired_bootstrap_ci,
)
from pipeline.eval.verifiable import verifiable

STAGE = "evaluate"
READS = ["evaluate", "train.dpo", "paths.base_model", "paths.model", "paths.dataset", "paths.eval_prompts",
         "paths.ifeval_prompts", "paths.train_prompts",
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
    ifeval_prompts: Path | None = None  # IFEval-format prompts evaluated beside eval_prompts
    train_prompts: Path | None = None  # which instruction ids training saw (held-out ids are the rest)


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

    from pipeline.core.lineage import sha256_json

    min_clusters = p.bootstrap.min_clusters
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
        # Pairs built from one prompt are not independent: resample prompts (clusters), not pairs.
        prompts = [sha256_json(r["prompt"]) for r in pairs]
        est, lo, hi, k = cluster_bootstrap_ci(correct[scored], [c for c, s in zip(prompts, scored, strict=True) if s],
                                              min_clusters=min_clusters, **ci)
        m["pref_n_prompts"] = k
        _ci("pref_accuracy", (est, lo, hi), m)
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


def judged(p: EvaluateParams, general: list[dict], resp_base: list[str], resp_pol: list[str],
           len_base: np.ndarray, len_pol: np.ndarray, judge: Any, template: Any, cache: EvalCache,
           ci: dict) -> tuple[dict, Any]:
    """Win rate (both orders, ties half) and length-controlled win rate of the policy over the base."""
    import pandas as pd

    from pipeline.eval.judges import blank_rule, judge_pairs
    from pipeline.eval.lc import lc_bootstrap_ci, length_controlled

    probs = judge_pairs(judge, template, [(g["prompt"], rp, rb) for g, rp, rb in
                                          zip(general, resp_pol, resp_base, strict=True)], cache)
    first, second = [a for a, _ in probs], [b for _, b in probs]
    scores = pair_scores(first, second)

    m: dict[str, float] = {"n_general_prompts": len(general)}
    _ci("win_rate", paired_bootstrap_ci((scores,), mean_stat, **ci), m)
    # AlpacaEval 2's GLM, lengths in characters as AlpacaEval measures them (see pipeline.eval.lc)
    chars = np.array([len(a) - len(b) for a, b in zip(resp_pol, resp_base, strict=True)], dtype=float)
    lc = length_controlled(["policy"] * len(scores), [g["id"] for g in general], scores, chars, C=p.judge.lc_c)["policy"]
    lo, hi = lc_bootstrap_ci(scores, chars, C=p.judge.lc_c, n_resamples=p.judge.lc_n_resamples,
                             confidence_level=ci["confidence_level"], seed=ci["seed"],
                             min_units=p.bootstrap.min_clusters)
    m.update({"lc_win_rate": lc.lc_win_rate, "lc_win_rate_ci_low": lo, "lc_win_rate_ci_high": hi,
              "lc_win_rate_se": lc.standard_error})
    m["win_rate_soft"] = float(np.mean((np.array(first) + np.array(second)) / 2))
    m["n_wins"], m["n_ties"], m["n_losses"] = (int((scores > 0.5).sum()), int((scores == 0.5).sum()),
                                               int((scores < 0.5).sum()))
    # both orders name the same winner (ties aside, this is the judge's freedom from position bias),
    # over the pairs the judge decided (a pair with a blank answer is decided by rule, not by it)
    asked = [pr for pr, rp, rb in zip(probs, resp_pol, resp_base, strict=True) if blank_rule(rp, rb) is None]
    m["judge_order_consistency"] = (float(np.mean([order_score(a) == order_score(b) for a, b in asked]))
                                    if asked else float("nan"))
    m["n_judged_pairs"] = len(asked)
    # A judge that mostly picks by position has not earned a say: its win rates stay out of the
    # model-index and of every gate (pipeline.release), and the card says why.
    m["judge_reliable"] = int(not asked or m["judge_order_consistency"] >= p.judge.min_order_consistency)
    m["judge_min_order_consistency"] = p.judge.min_order_consistency
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
    from pipeline.constraints.ifeval import read_ifeval
    from pipeline.eval.ifeval_eval import ifeval_metrics, is_ifeval_file, training_ids
    from pipeline.eval.judges import JUDGES, template_for

    for folder, stage in ((inp.base, "base_model"), (inp.policy, "train")):
        if not any(Path(folder).glob("*.safetensors")):
            raise SourceError(f"{folder}: no safetensors model here (run `dvc repro {stage}`)")
    if generate_fn is None:
        from pipeline.lm.generation import generate as generate_fn
    models = models or Models()
    ci = {"n_resamples": p.bootstrap.n_resamples, "confidence_level": p.bootstrap.confidence_level,
          "seed": p.bootstrap.seed}
    template = template_for(inp.judge_template, p.judge)
    eval_is_ifeval = is_ifeval_file(inp.eval_prompts)
    rows = [] if eval_is_ifeval else read_prompts(inp.eval_prompts)[: p.max_eval_prompts]
    sets = {}  # IFEval-format prompt sets: metric prefix -> rows
    if eval_is_ifeval:
        sets["eval_ifeval_"] = read_ifeval(inp.eval_prompts)[: p.max_eval_prompts]
    if inp.ifeval_prompts is not None:
        sets["ifeval_"] = read_ifeval(inp.ifeval_prompts)
    general = read_general_prompts(inp.general_prompts, p.general)
    if judge is None:
        judge = JUDGES[p.judge.kind](p.judge, default_model=inp.base, sha256_of=models.sha256, loader=models.load)

    metrics, tables, timings = {}, {}, {}
    with _timed("preference", timings):
        m, tables["preference"] = preference(models, inp, p, cache, ci)
    metrics.update(m)

    if_rows = [r for rs in sets.values() for r in rs]
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows + if_rows + general]
    with _timed("generate_base", timings):
        resp_b, fin_b = generations(models, inp.base, convs, p, cache, generate_fn, "evaluate: base")
    with _timed("generate_policy", timings):
        resp_p, fin_p = generations(models, inp.policy, convs, p, cache, generate_fn, "evaluate: policy")
    k, kf = len(rows), len(rows) + len(if_rows)
    mc = p.bootstrap.min_clusters
    if rows:
        m, tables["constraints"] = verifiable(rows, resp_b[:k], resp_p[:k], ci, fin_b[:k], fin_p[:k], mc)
        metrics.update(m)
    train_ids = training_ids(inp.train_prompts)
    if rows and all("instruction_id_list" in r for r in rows):  # project prompts in IFEval ids: split them too
        m, tables["eval_ifeval"] = ifeval_metrics(rows, {"base": resp_b[:k], "policy": resp_p[:k]},
                                                  {"base": fin_b[:k], "policy": fin_p[:k]}, train_ids, ci, mc,
                                                  prefix="eval_ifeval_")
        metrics.update(m)
    start = k
    for prefix, rs in sets.items():
        sl = slice(start, start + len(rs))
        m, tables[prefix.rstrip("_")] = ifeval_metrics(rs, {"base": resp_b[sl], "policy": resp_p[sl]},
                                                       {"base": fin_b[sl], "policy": fin_p[sl]}, train_ids, ci, mc,
                                                       prefix=prefix)
        metrics.update(m)
        start += len(rs)
    if eval_is_ifeval:  # the headline pass rates: IFEval prompt-level strict with the validity rule
        for who in ("base", "policy", "delta"):
            for suf in ("", "_ci_low", "_ci_high"):
                metrics[f"pass_rate_{who}{suf}"] = metrics[f"eval_ifeval_prompt_strict_valid_{who}{suf}"]
    for name, resp, fin in (("base", resp_b, fin_b), ("policy", resp_p, fin_p)):
        metrics[f"empty_rate_{name}"] = float(np.mean([not r.strip() for r in resp]))
        metrics[f"unfinished_rate_{name}"] = float(np.mean([f is False for f in fin]))
    metrics["n_responses_per_model"] = len(convs)

    tok = models.tokenizer(inp.base)
    len_b = np.array([len(tok.encode(r, add_special_tokens=False)) for r in resp_b], dtype=float)
    len_p = np.array([len(tok.encode(r, add_special_tokens=False)) for r in resp_p], dtype=float)
    with _timed("judge", timings):
        m, tables["general"] = judged(p, general, resp_b[kf:], resp_p[kf:], len_b[kf:], len_p[kf:], judge,
                                      template, cache, ci)
    metrics.update(m)

    with _timed("kl", timings):
        kl = np.array(kls(models, inp.policy, inp.base, convs, resp_p, p, cache), dtype=float)
    metrics.update({"length_base": float(len_b.mean()), "length_policy": float(len_p.mean()),
                    "length_ratio": float(len_p.mean() / len_b.mean()) if len_b.mean() > 0 else float("nan"),
                    "kl": float(kl[:, 0].mean()),
                    "kl_per_token": float(kl[:, 0].sum() / kl[:, 1].sum()) if kl[:, 1].sum() > 0 else 0.0})
    if rows:
        tables["constraints"]["kl"] = kl[:k, 0]
    tables["general"]["kl"] = kl[kf:, 0]
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
                 max_length=dpo_setting(P.train.dpo, "max_length"),
                 ifeval_prompts=ctx.path("ifeval_prompts") if P.paths.ifeval_prompts else None,
                 train_prompts=ctx.path("train_prompts"))
    models = Models()
    for path in (inp.base, inp.policy):
        models.known(path, ctx.add_input(path, log_dataset=False).sha256)  # hash each model folder once
    from pipeline.lm.template import check_template

    for path, what in ((inp.base, "evaluate (base model)"), (inp.policy, "evaluate (trained model)")):
        ctx.record.extra["chat_template_sha256"] = check_template(models.tokenizer(path), inp.base, what)
    test_art = ctx.add_input(test, name="test split")
    for path in (inp.eval_prompts, inp.general_prompts, inp.judge_template, inp.train_prompts, inp.ifeval_prompts):
        if path is not None:
            ctx.add_input(path)
    if inp.ifeval_prompts is not None:
        from pipeline.eval.ifeval_subset import read_meta

        ctx.record.extra["ifeval_subset"] = {"path": P.paths.ifeval_prompts, **(read_meta(inp.ifeval_prompts) or {})}
    ctx.record.extra["generation"] = {"do_sample": False, "max_new_tokens": P.evaluate.generation.max_new_tokens,
                                      "chat_template": True, "batch_size": P.evaluate.generation.batch_size,
                                      "precision": P.evaluate.generation.precision}
    # Content-keyed and written one atomic file per entry, so sweep members share the main workspace's
    # cache: the base model's generations, log-probs and judgments are computed once per sweep.
    cache = EvalCache(shared_cache_dir(ctx.root, P.paths.eval_cache, env=ENV_EVAL_CACHE_DIR))
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
    from pipeline.core.runtime import tune

    tune()  # allocator and OpenMP wait policy, before torch is imported
    main()
