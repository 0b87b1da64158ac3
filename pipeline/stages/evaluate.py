"""Stage `evaluate`: the trained model against its reference (the base model) on data neither saw.

Reads:  `paths.model` (trained), `paths.base_model` (reference), `paths.dataset/test.parquet`,
        the prompt sets `paths.test_prompts` (reported), `paths.dev_prompts` (selection),
        `paths.ifeval_prompts` (the IFEval subset) and `paths.general_prompts` (judged), each in the
        project's format or IFEval's; `paths.train_prompts` (which instruction ids training saw),
        `paths.judge_template` and `paths.judge_labels` (human-labelled judge pairs); params
        `evaluate`, `validity` (what makes an answer degenerate) and `train.dpo` (beta and max_length,
        so the implicit reward is the one training optimised); `paths.runs/train.json`
        `mlflow_model_id` when present (the MLflow LoggedModel the metrics are attached to).
Writes: `paths.metrics/eval.json` (flat DVC metrics), one Parquet table per unit in `paths.eval_dir`
        (`test`, `dev`, `ifeval`, `general`, `panel`, `preference`, `judge_human`),
        `paths.plots/eval_pass_rates.png`, `paths.plots/eval_win_rate.png`, and the cache
        `paths.eval_cache` (DVC `persist: true`).
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
2. Verifiable instruction following (`pipeline.eval.verifiable.score_set`, one function for every
   set): greedy answers of both models to the test, dev and IFEval-subset prompts, checked by
   IFEval's strict rules and by the validity rule (`pipeline.constraints.validity`): an empty, too
   short, looping, prompt-copying, reused or cut answer is a failed answer. `pass_rate_*` (the
   headline, on test) and `dev_pass_rate_*` (what selection reads) are prompt-level strict passes of
   valid answers; `test_ifeval_*` and `ifeval_*` add IFEval's reference accuracies, which ignore the
   validity rule so they compare with published numbers, with instruction ids the training prompts
   never use reported apart (`*_heldout_*` vs `*_indist_*`).
   Degeneration: per unit `<unit>_degenerate_rate_{base,policy,delta}`, and over every evaluation
   answer `degenerate_rate_*` and each rule's `<rule>_rate_*`, all with intervals.
   The trivial-answer panel (`pipeline.eval.panel`): answers that need no model, scored on the test
   prompts by the same function; `pass_rate_floor` is the best of them, printed beside the headline
   and gated on in the release.
3. Judged win rate on the general prompts: each (policy, base) pair judged in both orders; a pair
   judged differently in the two orders is a tie; ties count half; a blank answer loses without
   the judge. Length-controlled win rate: AlpacaEval 2's GLM (`pipeline.eval.lc`) with its standard
   error and a bootstrap interval. `judge_order_consistency` (the share of pairs the judge
   decides the same way in both orders) says how much the judge's verdicts are worth: below
   `judge.min_order_consistency` `judge_reliable` is 0 and the release leaves its win rates out of
   the model-index and of every gate. A tie names no winner, so a judge that always ties scores 0.
   The same judge is measured against people on `paths.judge_labels` every run
   (`pipeline.eval.judge_agreement.human_agreement`): `judge_human_agreement` and `judge_human_kappa`
   with intervals over the pairs it judged (`judge_human_n_judged`; pairs settled by the blank-answer
   rule are `judge_human_n_rule`, not counted); a kappa interval that includes 0 (or none, NaN) sets
   `judge_human_reliable` and `judge_reliable` to 0.
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

from pipeline.constraints.validity import Rules
from pipeline.core.errors import SourceError
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.params import EvaluateParams
from pipeline.core.rounds import ROUND_READS
from pipeline.core.shared import ENV_EVAL_CACHE_DIR, shared_cache_dir
from pipeline.core.stage import StageContext, stage_main
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, generations, kls, read_general_prompts
from pipeline.eval.pairwise import judged, preference  # noqa: F401 (the stage's phases; tests import them here)

STAGE = "evaluate"
READS = ["evaluate", "validity", "train.dpo", "paths.base_model", "paths.model", "paths.dataset", "paths.test_prompts",
         "paths.dev_prompts",
         "paths.ifeval_prompts", "paths.train_prompts",
         "paths.general_prompts", "paths.judge_template", "paths.eval_dir", "paths.eval_cache",
         "paths.metrics", "paths.plots", "paths.judge_labels"]
TEST_SPLIT = "test.parquet"  # the file `build` writes in paths.dataset (data contract)
METRICS_FILE = "eval.json"

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    base: Path
    policy: Path
    test: Path
    test_prompts: Path
    general_prompts: Path
    judge_template: Path
    beta: float
    max_length: int | None
    ifeval_prompts: Path | None = None  # IFEval-format prompts evaluated beside the test prompts
    train_prompts: Path | None = None  # which instruction ids training saw (held-out ids are the rest)
    judge_labels: Path | None = None  # human-labelled pairs the judge is measured on (paths.judge_labels)
    dev_prompts: Path | None = None  # the selection set: scored like test, read by the sweep rule, never reported
    rules: Rules | None = None  # params `validity`: what makes an answer degenerate (None: the defaults)


@dataclass
class Result:
    metrics: dict[str, float]
    tables: dict[str, Any] = field(default_factory=dict)  # name -> pandas DataFrame
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (MLflow only, not DVC metrics)
    judge: dict[str, Any] = field(default_factory=dict)  # id and template sha256 the judge figures belong to


def answer_sets(models: Models, folder: Path, units: dict[str, list[dict]], p: EvaluateParams, cache: EvalCache,
                generate_fn: Callable[..., list[list[str]]], who: str) -> dict[str, tuple[list[str], list[bool | None]]]:
    """Greedy answers of the model in `folder` to every prompt of every named unit: one batched call,
    the answers handed back per unit by key."""
    keys = [(name, i) for name, rows in units.items() for i in range(len(rows))]
    convs = [[{"role": "user", "content": units[name][i]["prompt"]}] for name, i in keys]
    texts, fins = generations(models, folder, convs, p, cache, generate_fn, f"evaluate: {who}")
    got = dict(zip(keys, zip(texts, fins, strict=True), strict=True))
    return {name: ([got[name, i][0] for i in range(len(rows))], [got[name, i][1] for i in range(len(rows))])
            for name, rows in units.items()}


def run(p: EvaluateParams, inp: Inputs, cache: EvalCache, out_dir: Path, *, models: Models | None = None,
        generate_fn: Callable[..., list[list[str]]] | None = None, judge: Any = None) -> Result:
    """Evaluate `inp.policy` against `inp.base`; write one Parquet table per unit into `out_dir`.

    The units, each read, answered, scored and written under its name: `test` (the headline and the
    model-index), `dev` (what selection reads), `ifeval` (the IFEval subset), `general` (the judged
    win rate), `panel` (trivial answers to the test prompts), `preference` (the test pairs) and
    `judge_human` (the judge against people)."""
    from pipeline.constraints.validity import assess
    from pipeline.eval.ifeval_eval import ifeval_metrics, training_ids
    from pipeline.eval.judges import JUDGES, template_for
    from pipeline.eval.panel import run_panel
    from pipeline.eval.verifiable import (
        degeneration_metrics,
        headline_metrics,
        read_prompt_set,
        score_set,
        set_table,
        verdict_columns,
    )

    for folder, stage in ((inp.base, "base_model"), (inp.policy, "train")):
        if not any(Path(folder).glob("*.safetensors")):
            raise SourceError(f"{folder}: no safetensors model here (run `dvc repro {stage}`)")
    if generate_fn is None:
        from pipeline.lm.generation import generate as generate_fn
    models = models or Models()
    rules = inp.rules or Rules()
    ci = {"n_resamples": p.bootstrap.n_resamples, "confidence_level": p.bootstrap.confidence_level,
          "seed": p.bootstrap.seed}
    mc = p.bootstrap.min_clusters
    template = template_for(inp.judge_template, p.judge)
    sets = {"test": read_prompt_set(inp.test_prompts, p.max_eval_prompts)}
    if inp.dev_prompts is not None:
        sets["dev"] = read_prompt_set(inp.dev_prompts, p.max_eval_prompts)
    if inp.ifeval_prompts is not None:
        sets["ifeval"] = read_prompt_set(inp.ifeval_prompts)
    units = {**sets, "general": read_general_prompts(inp.general_prompts, p.general)}
    if judge is None:
        judge = JUDGES[p.judge.kind](p.judge, default_model=inp.base, sha256_of=models.sha256, loader=models.load)

    metrics, tables, timings = {}, {}, {}
    with _timed("preference", timings):
        m, tables["preference"] = preference(models, inp, p, cache, ci)
    metrics.update(m)

    answers = {}
    for who, folder in (("base", inp.base), ("policy", inp.policy)):
        with _timed(f"generate_{who}", timings):
            answers[who] = answer_sets(models, folder, units, p, cache, generate_fn, who)

    # Every prompt set with instructions is scored by one function (pipeline.eval.verifiable.score_set),
    # the one `openrelease score` and the trivial-answer panel use.
    scores = {name: {who: score_set(rows, *answers[who][name], rules) for who in ("base", "policy")}
              for name, rows in sets.items()}
    train_ids = training_ids(inp.train_prompts)
    metrics.update(headline_metrics("", scores["test"], ci, mc))  # pass_rate_*: the headline
    metrics["n_test_prompts"] = len(sets["test"])
    metrics.update(ifeval_metrics(scores["test"], train_ids, ci, mc, prefix="test_ifeval_"))
    if "dev" in sets:
        metrics.update(headline_metrics("dev_", scores["dev"], ci, mc))
        metrics["n_dev_prompts"] = len(sets["dev"])
    if "ifeval" in sets:
        metrics.update(ifeval_metrics(scores["ifeval"], train_ids, ci, mc, prefix="ifeval_"))
    for name in sets:
        tables[name] = set_table(scores[name])
    m, tables["panel"] = run_panel(sets["test"], scores["test"]["base"].responses, rules)
    metrics.update(m)

    general = units["general"]
    verdicts = {name: {who: s.verdicts for who, s in by_model.items()} for name, by_model in scores.items()}
    verdicts["general"] = {who: assess([g["prompt"] for g in general], *answers[who]["general"], rules,
                                       [g["id"] for g in general]) for who in ("base", "policy")}
    for name, by_model in verdicts.items():
        metrics.update(degeneration_metrics(f"{name}_", by_model, ci, mc))
    pooled = {who: [v for name in units for v in verdicts[name][who]] for who in ("base", "policy")}
    metrics.update(degeneration_metrics("", pooled, ci, mc, per_rule=True))
    metrics["n_responses_per_model"] = len(pooled["base"])

    tok = models.tokenizer(inp.base)
    lengths = {who: {name: np.array([len(tok.encode(r, add_special_tokens=False)) for r in answers[who][name][0]],
                                    dtype=float) for name in units} for who in ("base", "policy")}
    with _timed("judge", timings):
        m, tables["general"] = judged(p, general, answers["base"]["general"][0], answers["policy"]["general"][0],
                                      lengths["base"]["general"], lengths["policy"]["general"], judge, template,
                                      cache, ci)
    metrics.update(m)
    for who in ("base", "policy"):
        for col, values in verdict_columns(who, verdicts["general"][who]).items():
            tables["general"][col] = values
    if inp.judge_labels is not None:  # the judge against people, every run; a kappa interval that includes 0 gates nothing
        from pipeline.eval.judge_agreement import human_agreement

        with _timed("judge_human", timings):
            m, tables["judge_human"] = human_agreement(judge, template, inp.judge_labels, cache, ci, min_units=mc)
        metrics.update({**m, "judge_reliable": int(metrics["judge_reliable"] and m["judge_human_reliable"])})

    kl_by_unit = {}
    with _timed("kl", timings):
        for name, rows in units.items():
            convs = [[{"role": "user", "content": row["prompt"]}] for row in rows]
            kl_by_unit[name] = np.array(kls(models, inp.policy, inp.base, convs, answers["policy"][name][0], p, cache),
                                        dtype=float).reshape(-1, 2)
            tables[name]["kl"] = kl_by_unit[name][:, 0]
    kl = np.concatenate([kl_by_unit[n] for n in units])
    len_b = np.concatenate([lengths["base"][n] for n in units])
    len_p = np.concatenate([lengths["policy"][n] for n in units])
    metrics.update({"length_base": float(len_b.mean()), "length_policy": float(len_p.mean()),
                    "length_ratio": float(len_p.mean() / len_b.mean()) if len_b.mean() > 0 else float("nan"),
                    "kl": float(kl[:, 0].mean()),
                    "kl_per_token": float(kl[:, 0].sum() / kl[:, 1].sum()) if kl[:, 1].sum() > 0 else 0.0})
    for name, df in tables.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
    log.info("cache: %s", cache.stats())
    log.info("seconds per phase (wall/cpu): %s", timings)
    return Result(metrics=metrics, tables=tables, timings=timings,
                  judge={"id": judge.id, "template_sha256": template.sha256,
                         **({"snapshot": judge.snapshot} if getattr(judge, "snapshot", None) else {})})


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
    from pipeline.eval.plots import write_plots

    P = ctx.params
    test = ctx.path("dataset") / TEST_SPLIT
    inp = Inputs(base=ctx.path("base_model"), policy=ctx.path("model"), test=test,
                 test_prompts=ctx.path("test_prompts"), dev_prompts=ctx.path("dev_prompts"),
                 general_prompts=ctx.path("general_prompts"), rules=Rules.of(P.validity),
                 judge_template=ctx.path("judge_template"), beta=float(dpo_setting(P.train.dpo, "beta")),
                 max_length=dpo_setting(P.train.dpo, "max_length"),
                 ifeval_prompts=ctx.path("ifeval_prompts") if P.paths.ifeval_prompts else None,
                 train_prompts=ctx.path("train_prompts"),
                 judge_labels=ctx.path("judge_labels") if P.paths.judge_labels else None)
    models = Models()
    for path in (inp.base, inp.policy):
        models.known(path, ctx.add_input(path, log_dataset=False).sha256)  # hash each model folder once
    from pipeline.lm.template import check_template

    for path, what in ((inp.base, "evaluate (base model)"), (inp.policy, "evaluate (trained model)")):
        ctx.record.extra["chat_template_sha256"] = check_template(models.tokenizer(path), inp.base, what)
    test_art = ctx.add_input(test, name="test split")
    for path in (inp.test_prompts, inp.dev_prompts, inp.general_prompts, inp.judge_template, inp.train_prompts,
                 inp.ifeval_prompts, inp.judge_labels):
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
    ctx.record.extra["judge"] = {**result.judge, "template": P.paths.judge_template, "labels": P.paths.judge_labels}
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
    if model_id and ctx.run.log_model_metrics(model_id, result.metrics, dataset=(test, test_art.sha256)):
        ctx.run_facts["logged_model_id"] = model_id
    elif not model_id:
        log.info("no LoggedModel id in %s/train.json: metrics are on the evaluate run only", P.paths.runs)


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage evaluate_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "evaluate_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    from pipeline.core.runtime import tune

    tune()  # allocator and OpenMP wait policy, before torch is imported
    main()
