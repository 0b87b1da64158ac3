"""The dataset repo tells the truth and loads (issue 22.4): the card's origin, configs, split rules and
cut counts come from the run's files; the `eval_answers` config rescores to the published verdicts with
`openrelease score`; `croissant.json` validates with mlcroissant and its sha256 values are the files';
`datasets.load_dataset` loads every config of the published folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.core.lineage import sha256_file
from pipeline.core.params import load_params
from pipeline.release.publish import dry_run
from tests.release_fixture import ROOT, make_release_project

ON_POLICY = [{"name": "on-policy", "format": "ultrafeedback", "path": "outputs/rated.jsonl", "license": "Apache-2.0"},
             {"name": "hh", "format": "hh-rlhf", "path": "data/sources/hh.jsonl", "license": "MIT"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    project = make_release_project(tmp_path_factory.mktemp("ds") / "proj", tiny_model_dir, sources=ON_POLICY)
    return dry_run(load_params(project / "params.yaml"), project, project / "release")


def _card(bundle) -> str:
    return (bundle.path / "dataset" / "README.md").read_text()


def test_card_says_where_the_data_came_from_with_the_runs_numbers(bundle):
    card = _card(bundle)
    params = load_params(ROOT / "params.yaml")
    gen = json.loads((bundle.path.parent / "metrics" / "generate.json").read_text())
    g = params.generate
    assert (f"answered each of the {gen['prompts']} prompts of `paths.train_prompts`" in card
            and f"{g.samples_per_prompt} times, sampling at temperature {g.temperature:.4g}" in card
            and f"{gen['completions']} samples, of which {gen['truncated_completions']} stopped at the token limit" in card)
    assert params.base_model.name in card and "IFEval's strict checkers" in card and "`pipeline/constraints/`" in card
    assert "**No UltraFeedback data is in this dataset**" in card
    assert "| on-policy | ultrafeedback |" not in card          # the misleading sources row is gone
    model_card = (bundle.path / "model" / "README.md").read_text()
    assert "| on-policy | on-policy samples rated by `rate` (UltraFeedback layout) | `outputs/rated.jsonl` |" in model_card
    # the source archive lives in the model repo: the dataset card's reproduce steps fetch it from there
    assert ("hf download open-release/smollm2-135m-dpo --revision v0.1.0 --include 'source/*' --local-dir model" in card
            and "tar xzf model/source/open-release-v0.1.0.tar.gz" in card)
    assert re.search(r"\| hh \| hh-rlhf \| `data/sources/hh.jsonl` \| sha256 `[0-9a-f]{12}` \| MIT \| 1 \|", card)


def test_card_explains_every_config_split_rule_and_cut_counts(bundle):
    card, ds = _card(bundle), bundle.path / "dataset"
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    for c in meta["configs"]:
        for df in c["data_files"]:
            assert (ds / df["path"]).is_file()
            assert f"| `{c['config_name']}` | {df['split']} | `{df['path']}` |" in card   # each one described
    names = {c["config_name"] for c in meta["configs"]}
    assert {"default", "provenance", "test_prompts", "eval_answers"} <= names
    params = load_params(ROOT / "params.yaml").build
    assert f"| train | 4 | 4 | 1.00 | `{params.binarize}`: one pair per prompt" in card
    assert f"| test | 1 | 1 | 1.00 | `{params.test_binarize}`: every pair of a prompt's samples" in card
    assert "**Why the sizes differ:**" in card and "Here 1 test prompts give 1 pairs and 4 train prompts give 4." in card
    assert "- `train`: chosen cut 0, rejected cut 2, unknown 0 of 4 pairs" in card
    assert "A pair from an external source has null in both" in card
    # a config without a described row fails the check above; a missing count would print n/a
    assert "n/a" not in card.split("## Configs")[1].split("## Splits")[0]


def test_prompt_sets_are_published_under_their_roles_split():
    from pipeline.release.dataset_repo import prompt_set_split

    assert [prompt_set_split(n) for n in ("train_prompts", "dev_prompts", "test_prompts", "ifeval_prompts")] == \
        ["train", "validation", "test", "test"]


def _eval_unit(tmp: Path, n: int = 14):
    """evaluate's real per-prompt table for the first `n` test prompts and made-up answers of two models."""
    from pipeline.constraints.validity import Rules
    from pipeline.eval.verifiable import read_prompt_set, score_set, set_table

    params = load_params(ROOT / "params.yaml")
    rows = read_prompt_set(ROOT / params.paths.test_prompts, n)
    prompts = tmp / "prompts.jsonl"
    src = (ROOT / params.paths.test_prompts).read_text().splitlines()[:n]
    prompts.write_text("\n".join(src) + "\n")
    answers = {"base": [r["prompt"] for r in rows],   # the prompt echoed: degenerate
               "policy": [f"here is a plain answer number {i} with no commas at all in it." for i in range(n)]}
    fins = {"base": [True] * n, "policy": [i % 3 != 0 for i in range(n)]}
    rules = Rules.of(params.validity)
    scores = {who: score_set(rows, answers[who], fins[who], rules) for who in ("base", "policy")}
    path = tmp / "test.parquet"
    set_table(scores).to_parquet(path, index=False)
    return path, prompts, scores, rules


def test_eval_answers_rescore_to_the_published_verdicts_with_openrelease_score(tmp_path):
    from pipeline.eval.score import score_file
    from pipeline.release.dataset_repo import EVAL_ANSWER_COLUMNS, eval_answers_table

    path, prompts, scores, rules = _eval_unit(tmp_path)
    table = eval_answers_table(path)
    assert tuple(table.column_names) == EVAL_ANSWER_COLUMNS and table.num_rows == 2 * 14
    rows = table.to_pylist()
    for who in ("base", "policy"):
        mine = [r for r in rows if r["model"] == who]
        assert [r["passed"] for r in mine] == scores[who].passed.tolist()
        assert [r["follow_strict"] for r in mine] == scores[who].follow
        resp = tmp_path / f"{who}.jsonl"   # what the card tells a reader to write
        resp.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "response", "finished")}) + "\n" for r in mine))
        _, per_prompt = score_file(resp, prompts, rules, {"n_resamples": 99, "confidence_level": 0.95, "seed": 0})
        assert [p["pass"] for p in per_prompt] == [r["passed"] for r in mine]
        assert [p["follow_strict"] for p in per_prompt] == [r["follow_strict"] for r in mine]
        assert [sorted(p["failed"]) for p in per_prompt] == [sorted(r["degenerate"]) for r in mine]
    base = [r for r in rows if r["model"] == "base"]
    assert all("prompt_copy" in r["degenerate"] and not r["valid"] for r in base)
    assert any(r["finished"] is False and "unfinished" in r["degenerate"] for r in rows if r["model"] == "policy")


def test_eval_answers_bad_table_is_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.errors import DataError
    from pipeline.release.dataset_repo import eval_answers_table

    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "p"}]), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: .*evaluate's per-prompt columns.*missing \['failed_base', "):
        eval_answers_table(tmp_path / "t.parquet")


def test_croissant_validates_with_mlcroissant_and_lists_every_files_sha256(bundle):
    mlc = pytest.importorskip("mlcroissant")
    ds = bundle.path / "dataset"
    doc = json.loads((ds / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    listed = {f["contentUrl"]: f["sha256"] for f in doc["distribution"]}
    on_disk = {p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file()} - {"croissant.json"}
    assert set(listed) == on_disk
    for rel, sha in listed.items():
        assert sha == sha256_file(ds / rel), rel
    for key in ("rai:dataCollection", "rai:dataCollectionType", "rai:dataAnnotationProtocol", "rai:dataBiases",
                "rai:personalSensitiveInformation", "rai:dataLimitations", "rai:dataUseCases",
                "rai:dataReleaseMaintenancePlan", "rai:machineAnnotationTools"):
        assert doc[key], key
    dataset = mlc.Dataset(jsonld=ds / "croissant.json")   # raises on any validation error
    assert not dataset.metadata.ctx.issues.errors and not dataset.metadata.ctx.issues.warnings
    assert dataset.metadata.data_collection == doc["rai:dataCollection"]
    import pyarrow.parquet as pq

    for rs in doc["recordSet"]:
        records = list(dataset.records(rs["@id"]))
        path = rs["field"][0]["source"]["fileObject"]["@id"]
        assert len(records) == pq.ParquetFile(ds / path).metadata.num_rows, rs["@id"]
    first = next(iter(dataset.records("default/train")))
    assert first["default/train/chosen_cut"] is False and first["default/train/prompt"]["default/train/prompt/role"] == [b"user"]


def test_croissant_file_without_its_sha256_fails_mlcroissant(bundle, tmp_path):
    mlc = pytest.importorskip("mlcroissant")
    doc = json.loads((bundle.path / "dataset" / "croissant.json").read_text())
    del doc["distribution"][0]["sha256"]   # a FileObject must carry a checksum
    bad = tmp_path / "croissant.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(mlc.ValidationError):
        mlc.Dataset(jsonld=bad)


def test_load_dataset_loads_every_config_of_the_published_folder(bundle):
    import datasets
    import yaml

    ds = bundle.path / "dataset"
    meta = yaml.safe_load(_card(bundle).split("---")[1])
    names = datasets.get_dataset_config_names(str(ds))
    assert set(names) == {c["config_name"] for c in meta["configs"]}
    import pyarrow.parquet as pq

    for c in meta["configs"]:
        d = datasets.load_dataset(str(ds), c["config_name"])
        for df in c["data_files"]:
            assert d[df["split"]].num_rows == pq.ParquetFile(ds / df["path"]).metadata.num_rows
    ev = datasets.load_dataset(str(ds), "eval_answers", split="test")
    assert set(ev["model"]) == {"base", "policy"} and isinstance(ev[0]["follow_strict"], list)
    pairs = datasets.load_dataset(str(ds), split="train")
    assert {"chosen_cut", "rejected_cut"} <= set(pairs.column_names)


def test_audit_checks_croissants_sha256_values(bundle, tmp_path):
    import shutil

    from pipeline.release import audit
    from pipeline.release.croissant import check_croissant

    report = audit.check_bundle(bundle.path)
    assert [c.status for c in report.checks if c.name == "croissant"] == [audit.PASSED]
    copy = tmp_path / "dataset"
    shutil.copytree(bundle.path / "dataset", copy)
    assert check_croissant(copy) == []
    (copy / "data" / "train.parquet").write_bytes((copy / "data" / "test.parquet").read_bytes())
    (copy / "data" / "extra.parquet").write_bytes(b"x")
    problems = check_croissant(copy)
    assert any(p.startswith("croissant.json: sha256 of data/train.parquet is ") for p in problems)
    assert "croissant.json: does not list data/extra.parquet" in problems
