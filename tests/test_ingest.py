"""Stage ingest (sources -> normalised rows), and the three data stages wired through run_stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import DataError, SourceError
from pipeline.core.lineage import sha256_file
from pipeline.core.params import DataParams, load_params
from pipeline.stages import ingest
from tests.conftest import ROOT, shared_data

PARAMS = load_params(ROOT / "params.yaml")


def uf_row(i: int, ratings=("5", "2")) -> dict:
    return {"id": f"p{i}", "instruction": f"Write a haiku about the number {i}.", "models": ["base"] * len(ratings),
            "completions": [{"model": "base", "response": f"answer {i}.{k}", "annotations": {
                "instruction_following": {"Rating": r, "Rationale": "checked"}}, "constraint_results": []}
                for k, r in enumerate(ratings)]}


def test_default_source_reads_paths_rated(tmp_path):
    paths = PARAMS.paths.model_copy(update={"rated": "outputs/rated.jsonl"})
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "rated.jsonl").write_text("".join(json.dumps(uf_row(i)) + "\n" for i in range(3)))
    out = tmp_path / "ingested"
    out.mkdir()
    counts = ingest.run(PARAMS.data, paths, out, tmp_path)  # the real params: on-policy at ${paths.rated}
    s = counts["sources"]["on-policy"]
    assert (s["rows"], s["completions"], s["path"]) == (3, 6, "outputs/rated.jsonl")
    assert s["sha256"] == sha256_file(tmp_path / "outputs" / "rated.jsonl")
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["on-policy:p0", "on-policy:p1", "on-policy:p2"]
    assert rows[0]["source_file"] == "outputs/rated.jsonl" and rows[0]["license"] == "Apache-2.0"
    assert json.loads((out / "counts.json").read_text()) == counts


def test_sources_limits_and_errors(tmp_path):
    hh = str(shared_data("hh-rlhf", "harmless-base_test.jsonl.gz"))
    data = DataParams.model_validate({"sources": [{"name": "hh", "format": "hh-rlhf", "path": hh, "license": "MIT",
                                                   "max_rows": 25}]})
    counts = ingest.run(data, PARAMS.paths, tmp_path, tmp_path)
    assert counts["sources"]["hh"]["rows"] == 25 and counts["sources"]["hh"]["max_rows_reached"]

    pinned = data.model_copy(deep=True)
    pinned.sources[0].sha256 = "0" * 64
    with pytest.raises(SourceError, match=r"data.sources\[hh\]: .* has sha256 [0-9a-f]{64}, params pin 0{64}"):
        ingest.run(pinned, PARAMS.paths, tmp_path, tmp_path)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(uf_row(1)) + "\n" + json.dumps(uf_row(2)) + "\n" + '{"instruction": "x",\n')
    bad = DataParams.model_validate({"sources": [{"name": "b", "format": "ultrafeedback", "path": str(broken),
                                                  "license": "MIT"}]})
    with pytest.raises(DataError, match=r"broken\.jsonl:3: valid JSON"):
        ingest.run(bad, PARAMS.paths, tmp_path, tmp_path)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    none = DataParams.model_validate({"sources": [{"name": "e", "format": "pairs", "path": str(empty), "license": "MIT"}]})
    with pytest.raises(DataError, match=r"empty\.jsonl: \[e\] source has rows: no rows were read"):
        ingest.run(none, PARAMS.paths, tmp_path, tmp_path)

    with pytest.raises(ValueError, match=r"DVC does not interpolate"):  # DVC could not track such a path
        DataParams.model_validate({"sources": [{"name": "r", "format": "pairs", "path": "${paths.rated}",
                                                "license": "MIT"}]})
    missing = DataParams.model_validate({"sources": [{"name": "m", "format": "pairs", "path": "nope.jsonl",
                                                      "license": "MIT"}]})
    with pytest.raises(SourceError, match=r"data.sources\[m\]: .*nope\.jsonl does not exist"):
        ingest.run(missing, PARAMS.paths, tmp_path, tmp_path)


def test_data_stages_through_run_stage(tmp_path, smollm_tokenizer_dir, monkeypatch):
    """ingest -> validate -> build as the CLI runs them: lineage records, MLflow inputs with sha256,
    metrics/data.json, the reports; then a broken line in a source stops ingest with its line number."""
    from mlflow.tracking import MlflowClient

    from pipeline.core.stage import run_stage
    from pipeline.stages import build, validate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OPENRELEASE_PIPELINE_KEY", "test-data-stages")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["base_model"] = str(smollm_tokenizer_dir)
    raw["data"]["sources"].append({"name": "lf", "format": "sharegpt", "license": "Apache-2.0", "max_rows": 30,
                                   "path": str(shared_data("llama-factory", "dpo_en_demo.json"))})
    raw["validate"]["max_length"] = 4096
    raw["train"]["dpo"]["max_length"] = 4096  # params require the two to agree
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    rated = tmp_path / raw["paths"]["rated"]
    rated.parent.mkdir(parents=True)
    rated.write_text("".join(json.dumps(uf_row(i, ("5", "3", "1"))) + "\n" for i in range(12)))
    # the project's other prompt files (train, dev, general) and the IFEval subset: build checks the roles
    # and decontaminates against every own evaluation set
    for key in ("train_prompts", "dev_prompts", "general_prompts", "ifeval_prompts"):
        (tmp_path / raw["paths"][key]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / raw["paths"][key], tmp_path / raw["paths"][key])
    test_prompts = tmp_path / raw["paths"]["test_prompts"]
    test_prompts.parent.mkdir(parents=True, exist_ok=True)
    test_prompts.write_text(json.dumps({"id": "eval-1", "prompt": "Write a haiku about the number 3.",
                                        "constraints": []}) + "\n")
    from pipeline.stages import decontam_set

    params_file = tmp_path / "params.yaml"
    for source in raw["data"]["sources"]:
        name = source["name"]
        run_stage(f"ingest_source.{name}", ingest.SOURCE_READS, ingest._source_body(name), params_file=params_file,
                  root=tmp_path)
    run_stage("decontam_set._own", decontam_set.OWN_READS, decontam_set._body_for("_own"), params_file=params_file,
              root=tmp_path)
    for mod in (ingest, validate, build):
        run_stage(mod.STAGE, mod.READS, mod._body, params_file=params_file, root=tmp_path)

    p = raw["paths"]
    metrics = json.loads((tmp_path / p["metrics"] / "data.json").read_text())
    assert metrics["read"] == 42 and metrics["read.lf"] == 30 and metrics["rows_unaccounted"] == 0
    assert metrics["filtered.decontaminated.test_prompts"] == 1  # "...the number 3." is an eval prompt
    # one LLaMA-Factory prompt holds mojibake C1 controls ("â\x80\x94" for an em dash): no_control_chars
    # 40 paired prompts; train has one pair each (best_vs_worst), a test prompt every strict ranking
    # (build.test_binarize): the 3-completion UltraFeedback rows give 3 test pairs, LLaMA-Factory's 1
    assert metrics["prompts_train"] + metrics["prompts_test"] == 40 and metrics["quarantined"] == 1
    assert metrics["pairs_train"] == metrics["prompts_train"] and metrics["prompts_test"] == round(0.2 * 40)
    assert metrics["prompts_test"] <= metrics["pairs_test"] <= 3 * metrics["prompts_test"]
    for name in ("train.parquet", "test.parquet", "provenance.parquet", "filtered.jsonl"):
        assert (tmp_path / p["dataset"] / name).is_file()
    assert (tmp_path / p["reports"] / "validation" / "docs" / "index.html").is_file()
    assert (tmp_path / p["reports"] / "pairs_validation" / "docs" / "index.html").is_file()
    assert json.loads((tmp_path / p["reports"] / "decontamination.json").read_text())["removed"] == 1

    lineage = json.loads((tmp_path / p["lineage"] / "ingest.json").read_text())
    inputs = {Path(a["path"]).name: a for a in lineage["inputs"]}
    assert inputs["rated.jsonl"]["sha256"] == sha256_file(rated) and inputs["rated.jsonl"]["rows"] == 12
    assert inputs["dpo_en_demo.json"]["rows"] == 30
    assert set(lineage["params"]) == {"data.sources", "paths.ingested_sources", "paths.ingested", "tracking",
                                      "paths.lineage", "paths.takedowns"}
    run_id = json.loads((tmp_path / p["runs"] / "ingest.json").read_text())["mlflow"]["run_id"]  # a run fact
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = {i.dataset.name: {t.key: t.value for t in i.tags} for i in client.get_run(run_id).inputs.dataset_inputs}
    assert logged["on-policy"]["sha256"] == sha256_file(rated)
    build_lineage = json.loads((tmp_path / p["lineage"] / "build.json").read_text())
    assert build_lineage["extra"]["counts"] == metrics

    with rated.open("a") as f:
        f.write('{"instruction": "truncated", "completions": [\n')
    with pytest.raises(DataError, match=r"rated\.jsonl:13: valid JSON"):
        run_stage("ingest_source.on-policy", ingest.SOURCE_READS, ingest._source_body("on-policy"),
                  params_file=params_file, root=tmp_path)
    # the set file changed after its decontam_set stage recorded it: build refuses to read it
    test_prompts.write_text(test_prompts.read_text() + json.dumps({"id": "eval-2", "prompt": "x", "constraints": []}) + "\n")
    with pytest.raises(SourceError, match=r"decontamination set test_prompts: .* its record in .* says"):
        run_stage(build.STAGE, build.READS, build._body, params_file=params_file, root=tmp_path)
