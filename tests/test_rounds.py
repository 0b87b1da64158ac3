"""Iterative DPO rounds without running a model: the params section, each round's view of the paths, the
params text `openrelease rounds` writes, the release's lineage keys, the pick, and the paired comparison
with the previous round."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core import rounds
from pipeline.core.errors import ParamsError
from pipeline.core.params import load_params, parse_params
from pipeline.eval.rounds import pick, versus_previous

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _with_rounds(raw, count: int, **over):
    params = parse_params(raw)
    out = copy.deepcopy(raw)
    out["rounds"].update(count=count, later=rounds.later_block(params, count), **over)
    return out


def test_default_is_one_round_and_no_round_stage(raw):
    p = parse_params(raw)
    assert p.rounds.count == 1 and p.rounds.later == {}
    assert rounds.names(p) == ["r1"] and rounds.read_summary(ROOT, p) is None
    assert rounds.release_view(p, ROOT) is p  # nothing to switch


def test_later_chains_each_round_to_the_one_before(raw):
    p = parse_params(_with_rounds(raw, 3))
    r2, r3 = p.rounds.later["r2"], p.rounds.later["r3"]
    assert (r2.model_in, r2.dataset_in, r2.eval_in, r2.summary_in) == (
        "models/trained", "outputs/dataset", "outputs/eval", "metrics/eval.json")
    assert (r3.model_in, r3.summary_in) == ("outputs/rounds/r2/model", "reports/rounds/r2/summary.json")
    assert p.section("rounds.later.r3.prompts") == "data/prompts/train.jsonl"


@pytest.mark.parametrize("change, message", [
    (lambda r: r["rounds"].update(count=3), "needs rounds.later to name exactly ['r2', 'r3']"),
    (lambda r: r["rounds"]["later"]["r2"].update(model_in="outputs/other"), "rounds.later.r2.model_in = 'outputs/other'"),
    (lambda r: r["rounds"].update(start_from="base"), "needs rounds.data = 'accumulate'"),
    (lambda r: r["rounds"].update(publish="r3"), "rounds.publish = 'r3'"),
    (lambda r: r["rounds"]["later"]["r2"].pop("prompts"), "rounds.later.r2.prompts: required key is missing"),
])
def test_a_wrong_rounds_section_names_the_key(raw, change, message):
    bad = _with_rounds(raw, 2)
    change(bad)
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_params(bad)


def test_each_stage_of_a_later_round_sees_its_own_paths(raw):
    p = parse_params(_with_rounds(raw, 3))
    gen = rounds.view(p, "r3", "generate")
    assert gen.paths.base_model == "outputs/rounds/r2/model"  # samples with the previous round's policy
    assert gen.paths.generations == "outputs/rounds/r3/generations.jsonl"
    assert gen.generate == p.generate  # the same decoding settings
    assert [s.path for s in rounds.view(p, "r2", "ingest").data.sources] == ["outputs/rounds/r2/rated.jsonl"]
    train = rounds.view(p, "r2", "train")
    assert train.paths.base_model == "models/trained" and train.paths.dataset == "outputs/rounds/r2/dataset"
    assert train.paths.ref_logps == "outputs/rounds/r2/ref_logps" and train.paths.plots == "plots/rounds/r2"
    ev = rounds.view(p, "r2", "evaluate")
    assert (ev.paths.base_model, ev.paths.dataset, ev.paths.model) == (
        "models/base", "outputs/dataset", "outputs/rounds/r2/model")  # against the base, on round 1's pairs
    base = parse_params(_with_rounds(raw, 2, start_from="base", data="accumulate"))
    assert rounds.view(base, "r2", "train").paths.base_model == "models/base"
    with pytest.raises(ParamsError, match="not a round after the first"):
        rounds.view(p, "r9", "generate")


def test_round_stages_read_only_their_own_entry():
    assert rounds.reads(["generate"], "r3") == ["generate", "rounds.start_from", "rounds.data", "rounds.dir",
                                                 "rounds.later.r3"]
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("generate_round", "rate_round", "ingest_round", "validate_round", "build_round", "train_round",
                 "evaluate_round", "rounds_report"):
        assert spec[name]["foreach"] == "${rounds.later}"
        assert "rounds.later.${key}" in spec[name]["do"]["params"] and "rounds" not in spec[name]["do"]["params"]
    assert "${item.model_in}" in spec["generate_round"]["do"]["deps"]  # the chain dvc dag draws


def test_openrelease_rounds_writes_the_section_and_back(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    params = load_params(ROOT / "params.yaml")
    two = rounds.with_count(text, params, 2)
    parsed = parse_params(yaml.safe_load(two))
    assert parsed.rounds.count == 2 and list(parsed.rounds.later) == ["r2"]
    assert text.count("\n") + 1 == two.count("\n")  # one line per round after the first, comments kept
    f = tmp_path / "params.yaml"
    f.write_text(two)
    assert rounds.with_count(two, load_params(f), 1) == text


def test_release_lineage_keys_the_shipped_round_as_the_release_stages(raw):
    p = parse_params(_with_rounds(raw, 2))
    lineage = {s: {"stage": s} for s in ("base_model", "generate", "train", "evaluate", "generate.r2", "train.r2",
                                         "evaluate.r2", "rounds_report.r2")}
    assert rounds.release_lineage(lineage, p) == lineage  # round 1 ships: unchanged
    shipped = p.model_copy(update={"paths": p.paths.model_copy(update={"model": "outputs/rounds/r2/model"})})
    keyed = rounds.release_lineage(lineage, shipped)
    assert keyed["train"] == {"stage": "train.r2"} and keyed["train.r1"] == {"stage": "train"}
    assert keyed["generate"] == {"stage": "generate.r2"} and keyed["base_model"] == {"stage": "base_model"}
    assert keyed["rounds_report"] == {"stage": "rounds_report.r2"}


def test_the_pick_reads_dev_metrics_only(raw):
    p = parse_params(_with_rounds(raw, 3, publish="rule"))
    rows = [{"round": f"r{k}", "metrics": {"dev_pass_rate_delta": d, "length_ratio": 1.0, "kl": kl,
                                           "dev_degenerate_rate_delta": 0.0, "pass_rate_delta": t}}
            for k, d, kl, t in ((1, 0.05, 0.1, 0.9), (2, 0.10, 0.2, -0.9), (3, 0.10, 0.3, 0.0))]
    assert pick(rows, "rule", p.rounds.selection)[0] == "r2"  # best dev; the tie with r3 goes to the lower KL
    assert pick(rows, "last", None)[0] == "r3" and pick(rows, "r1", None)[0] == "r1"
    rows[1]["metrics"]["length_ratio"] = 2.5  # breaks a constraint
    picked, why = pick(rows, "rule", p.rounds.selection)
    assert picked == "r3" and why.endswith("; r2 fails length_ratio <= 2.0 (mean 2.5)"), why


def test_versus_previous_is_paired_by_prompt(tmp_path):
    n = 40
    rng = np.random.default_rng(0)
    prev_pass = rng.random(n) < 0.3
    cur_pass = prev_pass | (rng.random(n) < 0.3)  # never worse on a prompt: the interval sits above 0
    for folder, passed in (("prev", prev_pass), ("cur", cur_pass)):
        (tmp_path / folder).mkdir()
        pd.DataFrame({"id": [f"p{i}" for i in range(n)], "pass_policy": passed,
                      "valid_policy": np.ones(n, dtype=bool)}).to_parquet(tmp_path / folder / "test.parquet")
    ci = {"n_resamples": 999, "confidence_level": 0.95, "seed": 0}
    out = versus_previous(tmp_path / "prev", tmp_path / "cur", ci, min_clusters=10)
    assert out["pass_rate_vs_previous"] == pytest.approx(cur_pass.mean() - prev_pass.mean())
    assert out["pass_rate_vs_previous_ci_low"] >= 0 and out["degenerate_rate_vs_previous"] == 0
    assert out["degenerate_rate_vs_previous_ci_low"] is None  # no variability: no interval
    other = pd.read_parquet(tmp_path / "cur" / "test.parquet").iloc[::-1]
    other.to_parquet(tmp_path / "cur" / "test.parquet")
    with pytest.raises(ValueError, match="other prompts"):
        versus_previous(tmp_path / "prev", tmp_path / "cur", ci, min_clusters=10)
