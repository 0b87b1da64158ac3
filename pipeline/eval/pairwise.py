"""The evaluate stage's pairwise measures: the implicit DPO reward on the held-out test pairs, and the
judged win rate of the trained model over the base on the general prompts (both orders, ties half,
AlpacaEval 2's length-controlled win rate). `pipeline.stages.evaluate` documents what each reports.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.core.params import EvaluateParams
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, logps, read_test_pairs
from pipeline.eval.stats import (
    cluster_bootstrap_ci,
    mean_stat,
    order_consistency,
    pair_scores,
    paired_bootstrap_ci,
)

log = logging.getLogger(__name__)


def _ci(prefix: str, est_lo_hi: tuple[float, float, float], metrics: dict[str, float]) -> None:
    est, lo, hi = est_lo_hi
    metrics.update({prefix: est, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})


def preference(models: Models, inp: Any, p: EvaluateParams, cache: EvalCache, ci: dict) -> tuple[dict, Any]:
    """Implicit-reward accuracy and margin on the held-out test pairs. `inp` names the models and the
    test split (`base`, `policy`, `test`) and the reward's `beta` and `max_length`."""
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

    outcome: dict[str, Any] = {}
    probs = judge_pairs(judge, template, [(g["prompt"], rp, rb) for g, rp, rb in
                                          zip(general, resp_pol, resp_base, strict=True)], cache, outcome=outcome)
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
    m["judge_order_consistency"] = order_consistency([a for a, _ in asked], [b for _, b in asked])  # a tie names no winner
    m["n_judged_pairs"] = len(asked)
    # A judge that mostly picks by position has not earned a say: its win rates stay out of the
    # model-index and of every gate (pipeline.release), and the card says why.
    m["judge_reliable"] = int(not asked or m["judge_order_consistency"] >= p.judge.min_order_consistency)
    m["judge_min_order_consistency"] = p.judge.min_order_consistency
    m["judge_unparsed"] = outcome["unparsed"]  # from the cache entries too: the same cold or warm
    table = pd.DataFrame({"id": [g["id"] for g in general], "prompt": [g["prompt"] for g in general],
                          "response_base": resp_base, "response_policy": resp_pol,
                          "p_policy_shown_first": first, "p_policy_shown_second": second, "score": scores,
                          "len_base": len_base.astype(int), "len_policy": len_pol.astype(int)})
    return m, table
