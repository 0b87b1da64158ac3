"""What the Hub shows as this model's results (issue 22.2): the model-index and `.eval_results/` hold
only this model's own results, once each, under names readers know, read back with huggingface_hub."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline.core.params import load_params
from pipeline.release import audit
from pipeline.release.hub_results import eval_result_files, index_by_name, model_index_results
from pipeline.release.manifest import ReleaseInfo
from pipeline.release.publish import dry_run
from tests.release_fixture import make_release_project

INFO = ReleaseInfo(version="v1", model_repo="org/model", dataset_repo="org/pairs", endpoint="https://hf.co",
                   commit="0" * 40, dirty=False)
# the shape evaluate writes: this model's results beside the base's, differences, floor, panel, dev, counts
METRICS = {
    "pass_rate_policy": 0.36, "pass_rate_policy_ci_low": 0.28, "pass_rate_policy_ci_high": 0.45,
    "pass_rate_base": 0.19, "pass_rate_delta": 0.17, "pass_rate_floor": 0.05,
    "test_ifeval_prompt_strict_valid_policy": 0.36, "test_ifeval_prompt_strict_policy": 0.40,
    "ifeval_prompt_strict_policy": 0.25, "ifeval_prompt_strict_base": 0.22, "ifeval_prompt_strict_delta": 0.03,
    "ifeval_inst_loose_policy": 0.41, "n_ifeval_prompts": 32, "n_test_prompts": 113,
    "panel_empty_pass_rate": 0.0, "dev_pass_rate_policy": 0.3, "dev_pass_rate_delta": 0.1,
    "pref_accuracy": 0.69, "pref_n": 126, "degenerate_rate_policy": 0.1, "kl": 0.08, "length_ratio": 1.1,
    "judge_reliable": 0, "win_rate": 0.4, "lc_win_rate": 0.45, "judge_order_consistency": 0.3,
}


def test_model_index_holds_only_this_models_results_once():
    res = model_index_results(METRICS, INFO)
    assert sorted(r.metric_value for r in res) == [0.25, 0.36, 0.40, 0.41, 0.69]   # no base/delta/floor/dev/judge
    assert len({r.metric_name for r in res}) == len(res)                           # names are unique
    assert 0.36 in [r.metric_value for r in res] and [r.metric_value for r in res].count(0.36) == 1  # no duplicate
    ifeval = next(r for r in res if r.metric_name == "IFEval prompt-level strict accuracy")
    assert (ifeval.dataset_name, ifeval.dataset_config, ifeval.task_name, ifeval.metric_type) == (
        "IFEval subset, 32 prompts", "ifeval_prompts", "Instruction following (IFEval)", "accuracy")
    headline = next(r for r in res if r.metric_name == "Prompt-level strict accuracy, degenerate answers fail")
    assert headline.metric_args == {"ci_low": 0.28, "ci_high": 0.45, "confidence_level": 0.95}
    assert all(not r.metric_type.endswith(("_policy", "_base")) for r in res)      # no internal ids
    assert {r.dataset_type for r in res} == {"org/pairs"} and {r.dataset_revision for r in res} == {"v1"}
    reliable = model_index_results({**METRICS, "judge_reliable": 1}, INFO)
    assert {r.metric_type for r in reliable} >= {"win_rate", "lc_win_rate"}


def test_eval_results_files_parse_as_the_hub_reads_them():
    from huggingface_hub import parse_eval_result_entries

    files = eval_result_files(METRICS, INFO)
    entries = {name: parse_eval_result_entries(yaml.safe_load(yaml.safe_dump(e))) for name, e in files.items()}
    assert sorted(e[0].value for e in entries.values()) == sorted(index_by_name(METRICS).values())
    e = entries["pass_rate.yaml"][0]
    assert (e.dataset_id, e.task_id, e.source_url) == ("org/pairs", "test_prompts", "https://hf.co/org/model")
    assert "95% CI [0.2800, 0.4500]" in e.notes and "revision v1" in e.notes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    project = make_release_project(tmp_path_factory.mktemp("hubres") / "proj", tiny_model_dir)
    return dry_run(load_params(project / "params.yaml"), project, project / "release")


def test_bundle_ships_eval_results_and_audit_catches_an_edited_value(bundle, tmp_path):
    folder = bundle.path / "model" / ".eval_results"
    assert (folder / "pass_rate.yaml").is_file() and (folder / "pref_accuracy.yaml").is_file()
    assert any(f["path"] == ".eval_results/pass_rate.yaml" for f in bundle.manifest["files"]["model"])
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    f = copy / "model" / ".eval_results" / "pass_rate.yaml"
    data = yaml.safe_load(f.read_text())
    data[0]["value"] = 0.99
    f.write_text(yaml.safe_dump(data))
    assert any(".eval_results/ holds" in p for p in audit._check_cards(copy / "model", copy / "dataset"))


def test_model_card_reads_in_order_with_every_metric_described(bundle):
    from pipeline.release.card_sections import describe

    text = (bundle.path / "model" / "README.md").read_text()
    order = ["## Results", "## Quick start", "## Training procedure", "<details>", "## Evaluation", "## Citation"]
    pos = [text.index(h) for h in ("## Results", "## Quick start", "## Training procedure", "## Citation")]
    assert pos == sorted(pos) and all(h in text for h in order)
    assert "this model **0.361**" in text and "scores 0.056 (`pass_rate_floor`)" in text
    assert "AutoPeftModelForCausalLM" in text and "Rafailov" in text and "TRL" in text
    start = text.index("| metric | what it measures | value | 95% interval |")
    table = text[start:text.index("</details>", start)].strip().splitlines()[2:]
    assert table and all(row.split(" | ")[1].strip() for row in table)       # no empty description
    assert describe("dev_pass_rate_delta").startswith("share of prompts") and "dev prompts" in describe("dev_pass_rate_delta")
    assert "trivial answer `empty`" in describe("panel_empty_pass_rate")
