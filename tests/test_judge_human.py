"""The judge against people: the shipped human-labelled set, agreement and kappa with intervals,
pairs settled by rule counted apart, order consistency that an always-tie judge cannot win,
`judge_unparsed` equal with a cold and a warm cache, and the card choosing agreement reports by
judge id and template hash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.params import load_params
from pipeline.eval.cache import EvalCache
from pipeline.eval.judge_agreement import agreement, read_labeled_pairs
from pipeline.eval.judges import OpenAIJudge, judge_pairs, load_template
from tests import test_evaluate
from tests.conftest import shared_data
from tests.test_judges import FakeJudgeServer, ScriptedJudge, _openai_params

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "data" / "judge" / "pairwise.txt"
HUMAN = ROOT / "data" / "judge" / "human_pairs.jsonl"
CI = {"n_resamples": 500, "confidence_level": 0.95, "seed": 0}
# the evaluate tests' fixtures (tiny base and policy models, prompt files), for run() end to end
eval_inputs, other_model_dir = test_evaluate.eval_inputs, test_evaluate.other_model_dir


@pytest.fixture
def template():
    return load_template(TEMPLATE)


class TieJudge:
    """Always P(A) = 0.5: a judge that says "tie" to everything (or whose replies never parse)."""

    id = {"kind": "always-tie"}
    unparsed = 0

    def prob_a(self, prompts):
        return [0.5] * len(prompts)


def _rows(spec):
    return [{"instruction": f"Q{i}", "response_a": a, "response_b": b, "label": lab, "line": i + 1}
            for i, (a, b, lab) in enumerate(spec)]


# ---------------------------------------------------------------- the four bugs of issue 21

def test_an_always_tie_judge_is_not_order_consistent(template, tmp_path):
    from pipeline.stages.evaluate import judged

    p = load_params(ROOT / "params.yaml").evaluate
    general = [{"id": str(i), "prompt": f"Q{i}"} for i in range(4)]
    resp = [f"answer {i}" for i in range(4)]
    m, _ = judged(p, general, resp, [r + "!" for r in resp], np.ones(4), np.ones(4), TieJudge(), template,
                  EvalCache(tmp_path / "e"), {**CI, "n_resamples": 100})
    assert m["judge_order_consistency"] == 0.0 and m["judge_reliable"] == 0
    s = agreement(TieJudge(), template, _rows([("x", "y", "A"), ("x", "y", "B")] * 6), EvalCache(tmp_path / "a"))
    assert s["order_consistency"] == 0.0 and s["agreement"] == 0.0 and not s["reliable"]

    from pipeline.eval.stats import order_consistency

    assert order_consistency([0.5, 0.5], [0.5, 0.5]) == 0.0  # a tie names no winner in either order
    assert order_consistency([0.9, 0.2, 0.5], [0.8, 0.4, 0.5]) == pytest.approx(2 / 3)


def test_pairs_settled_by_rule_count_apart_not_as_agreement(template, tmp_path):
    # the blank answer A loses by rule while people preferred it: that is no disagreement of the judge
    rows = _rows([("", "GOOD", "A"), ("GOOD", "x", "A"), ("x", "GOOD", "B")])
    judge = ScriptedJudge()
    s = agreement(judge, template, rows, EvalCache(tmp_path))
    assert s["n"] == 2 and s["agreement"] == 1.0  # only the pairs the judge judged
    assert s["n_rule"] == 1 and s["rule_agreement"] == 0.0 and s["n_pairs"] == 3
    assert judge.calls == 4


def test_judge_unparsed_is_the_same_with_a_cold_and_a_warm_cache(template, tmp_path, monkeypatch):
    from pipeline.stages.evaluate import judged

    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    p = load_params(ROOT / "params.yaml").evaluate
    general = [{"id": str(i), "prompt": f"Q{i}"} for i in range(3)]
    base, pol = ["GOOD a", "b", "c"], ["x", "GOOD y", "z"]
    with FakeJudgeServer() as server:
        server.reply = "I cannot decide."  # no verdict: a tie, counted as unparsed
        got = []
        for _ in range(2):  # cold, then warm (one probe request, the rest from the cache)
            m, _ = judged(p, general, base, pol, np.ones(3), np.ones(3), OpenAIJudge(_openai_params(server.url)),
                          template, EvalCache(tmp_path), {**CI, "n_resamples": 100})
            got.append(m["judge_unparsed"])
        assert len(server.requests) == 6 + 1
    assert got == [6, 6]
    outcome: dict = {}
    with FakeJudgeServer() as server:  # a parsed reply is stored as parsed
        judge_pairs(OpenAIJudge(_openai_params(server.url)), template, [("Q", "GOOD", "bad")],
                    EvalCache(tmp_path / "p"), outcome=outcome)
    assert outcome == {"by_rule": [False], "unparsed": 0}


def _card_inputs(tmp_path, reports: dict[str, dict], judge: dict, metrics: dict):
    from pipeline.release.inputs import ReleaseInputs

    paths = {}
    for name, rep in reports.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(rep))
        paths[name] = f
    return ReleaseInputs(root=tmp_path, params=load_params(ROOT / "params.yaml"),
                         lineage={"evaluate": {"stage": "evaluate", "extra": {"judge": judge}}},
                         metrics={"eval": metrics}, reports=paths)


def test_card_shows_agreement_reports_of_the_evaluated_judge_and_template_only(tmp_path):
    from pipeline.release.eval_card import evaluation_notes

    jid = {"kind": "local", "model_sha256": "ab" * 32}
    ran = {"id": jid, "template_sha256": "cd" * 32, "template": "data/judge/pairwise.txt"}
    labels = load_params(ROOT / "params.yaml").paths.judge_labels
    rep = {"n": 40, "agreement": 0.61, "kappa": 0.22, "kappa_ci_low": 0.05, "kappa_ci_high": 0.4,
           "agreement_no_tie": 0.61, "n_rule": 2}
    reports = {
        "judge_agreement_mine-1": {**rep, "file": "people.jsonl", "judge": jid, "template_sha256": "cd" * 32},
        # the same file name as paths.judge_labels, but another judge: says nothing about this one
        "judge_agreement": {**rep, "kappa": 0.93, "file": labels, "judge": {"kind": "openai"},
                            "template_sha256": "cd" * 32},
        "judge_agreement_other-2": {**rep, "kappa": 0.77, "file": "people.jsonl", "judge": jid,
                                    "template_sha256": "ef" * 32},
    }
    metrics = {"judge_order_consistency": 0.7, "judge_min_order_consistency": 0.6, "judge_reliable": 0,
               "judge_human_agreement": 0.55, "judge_human_agreement_ci_low": 0.42,
               "judge_human_agreement_ci_high": 0.68, "judge_human_kappa": 0.1, "judge_human_kappa_ci_low": -0.1,
               "judge_human_kappa_ci_high": 0.3, "judge_human_n_judged": 60, "judge_human_n_rule": 0,
               "judge_human_reliable": 0, "judge_human_order_consistency": 0.5}
    text = evaluation_notes(_card_inputs(tmp_path, reports, ran, metrics))
    assert "kappa 0.220" in text and "people.jsonl" in text
    assert "0.930" not in text and "0.770" not in text  # other judge, other template: left out
    assert "2 agreement reports for another judge or template were left out" in text
    assert "ab" * 6 in text and "cd" * 6 in text  # the judge and template the figures belong to
    assert "kappa 0.100 [-0.100, 0.300]" in text and "60 pairs judged" in text
    assert "does not agree with people beyond chance" in text


# ---------------------------------------------------------------- the shipped set and the stage's metrics

def test_shipped_human_pairs_are_the_seeded_selection():
    from pipeline.eval.human_pairs import read_source, select_pairs

    src = shared_data("hh-rlhf", "harmless-base_test.jsonl.gz")
    meta = json.loads(HUMAN.with_suffix(".meta.json").read_text())
    want = select_pairs(read_source(src), meta["size"], meta["seed"], meta["max_chars"])
    assert [json.loads(x) for x in HUMAN.read_text().splitlines()] == want
    rows = read_labeled_pairs(HUMAN)
    assert len(rows) == meta["size"] and {r["label"] for r in rows} == {"A", "B"}
    assert abs(sum(r["label"] == "A" for r in rows) - len(rows) / 2) <= 0.5


def test_params_name_the_shipped_set():
    params = load_params(ROOT / "params.yaml")
    assert params.paths.judge_labels and (ROOT / params.paths.judge_labels).resolve() == HUMAN.resolve()


def test_human_agreement_metrics_intervals_and_reliability(template, tmp_path):
    from pipeline.eval.judge_agreement import human_agreement

    f = tmp_path / "h.jsonl"
    spec = [("GOOD", "x", "A"), ("x", "GOOD", "B")] * 15 + [("GOOD", "x", "B")] * 6 + [("", "GOOD", "B")] * 2
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(spec)))
    m, table = human_agreement(ScriptedJudge(), template, f, EvalCache(tmp_path / "c"), CI, min_units=10)
    assert m["judge_human_n_judged"] == 36 and m["judge_human_n_rule"] == 2
    assert m["judge_human_agreement"] == pytest.approx(30 / 36)
    assert m["judge_human_agreement_ci_low"] < m["judge_human_agreement"] < m["judge_human_agreement_ci_high"]
    assert 0 < m["judge_human_kappa_ci_low"] < m["judge_human_kappa"] < m["judge_human_kappa_ci_high"]
    assert m["judge_human_reliable"] == 1 and m["judge_human_order_consistency"] == 1.0
    assert list(table["by_rule"]).count(True) == 2 and len(table) == 38
    # the always-tie judge: kappa 0, and its interval cannot be computed (every pair disagrees): unreliable
    m, _ = human_agreement(TieJudge(), template, f, EvalCache(tmp_path / "t"), CI, min_units=10)
    assert m["judge_human_kappa"] == 0.0 and math.isnan(m["judge_human_kappa_ci_low"])
    assert m["judge_human_reliable"] == 0
    # a judge at chance (where it puts GOOD has nothing to do with the label): kappa's interval includes 0
    rng = np.random.default_rng(1)
    g = tmp_path / "coin.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in _rows(
        [(("GOOD", "x") if rng.integers(2) else ("x", "GOOD")) + ("AB"[int(rng.integers(2))],) for _ in range(40)])))
    m, _ = human_agreement(ScriptedJudge(), template, g, EvalCache(tmp_path / "k"), CI, min_units=10)
    assert m["judge_human_kappa_ci_low"] <= 0 <= m["judge_human_kappa_ci_high"] and m["judge_human_reliable"] == 0
    # too few pairs: no interval, never a zero-width one
    m, _ = human_agreement(ScriptedJudge(), template, f, EvalCache(tmp_path / "c"), CI, min_units=100)
    assert math.isnan(m["judge_human_kappa_ci_low"]) and math.isnan(m["judge_human_agreement_ci_high"])


def test_kappa_statistic_matches_sklearn():
    from sklearn.metrics import cohen_kappa_score

    from pipeline.eval.stats import AGREEMENT_LABELS, kappa_stat

    rng = np.random.default_rng(0)
    h, j = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    want = cohen_kappa_score([AGREEMENT_LABELS[i] for i in h], [AGREEMENT_LABELS[i] for i in j],
                             labels=list(AGREEMENT_LABELS))
    assert float(kappa_stat(h, j)) == pytest.approx(want)
    assert np.isnan(kappa_stat(np.zeros(4), np.zeros(4)))


class KnowsPeople:
    """Picks the people's reply when it knows it (but the wrong one for texts in `flip`), otherwise the
    answer that sorts first: consistent in both orders, so only the check against people can fail it."""

    id = {"kind": "knows-people"}
    unparsed = 0

    def __init__(self, chosen: set[str], flip: set[str]):
        self.chosen, self.flip = chosen, flip

    def prob_a(self, prompts):
        out = []
        for text in prompts:
            a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
            b = text.split("[Answer B]\n")[1].split("\n\nWhich answer")[0]
            if a in self.chosen or b in self.chosen:
                p = 1.0 if a in self.chosen else 0.0
                out.append(1.0 - p if a in self.flip or b in self.flip else p)
            else:
                out.append(1.0 if a < b else 0.0)
        return out


def _people_judge(every: int | None) -> KnowsPeople:
    rows = read_labeled_pairs(HUMAN)
    chosen = {r["response_a"] if r["label"] == "A" else r["response_b"] for r in rows} if every else set()
    flip = {r["response_a"] for i, r in enumerate(rows) if every and i % every == 0}
    return KnowsPeople(chosen, flip)


@pytest.mark.parametrize("every, reliable", [(5, 1), (None, 0)])
def test_evaluate_measures_its_judge_against_people_every_run(eval_inputs, tmp_path, every, reliable):
    """run() with paths.judge_labels: a judge right on 4 of 5 human pairs keeps its say; one that
    ignores what people chose (but never contradicts itself across orders) loses it."""
    from pipeline.stages.evaluate import run

    eval_inputs.judge_labels = HUMAN
    res = run(test_evaluate._params(), eval_inputs, EvalCache(tmp_path / "c"), tmp_path,
              generate_fn=test_evaluate.FakeGenerate(),
              judge=_people_judge(every))
    m = res.metrics
    assert m["judge_order_consistency"] == 1.0 and m["judge_human_n_judged"] == 60 and m["judge_human_n_rule"] == 0
    assert m["judge_human_reliable"] == reliable and m["judge_reliable"] == reliable
    if every:
        assert m["judge_human_agreement"] == pytest.approx(48 / 60)
        assert 0 < m["judge_human_kappa_ci_low"] < m["judge_human_kappa"] < m["judge_human_kappa_ci_high"]
    else:
        assert m["judge_human_kappa_ci_low"] <= 0 <= m["judge_human_kappa_ci_high"]
    table = __import__("pandas").read_parquet(tmp_path / "judge_human.parquet")
    assert len(table) == 60 and set(table["label"]) == {"A", "B"} and table["id"].str.startswith("harmless-base").all()
    assert res.judge == {"id": {"kind": "knows-people"}, "template_sha256": load_template(TEMPLATE).sha256}


def test_a_judge_that_always_agrees_with_people_is_reliable():
    """Perfect agreement leaves no resample that differs (no interval), yet it is no reason for doubt;
    too few pairs, or an interval that includes 0, still are."""
    from pipeline.eval.judge_agreement import kappa_reliable

    perfect = {"kappa": 1.0, "agreement": 1.0, "n": 60, "kappa_ci_low": float("nan")}
    assert kappa_reliable(perfect, min_units=10)
    assert not kappa_reliable({**perfect, "n": 5}, min_units=10)
    assert not kappa_reliable({"kappa": 0.2, "agreement": 0.6, "n": 60, "kappa_ci_low": -0.05}, min_units=10)
    assert kappa_reliable({"kappa": 0.6, "agreement": 0.8, "n": 60, "kappa_ci_low": 0.38}, min_units=10)
