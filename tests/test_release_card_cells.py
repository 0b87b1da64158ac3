"""No "missing" cell in the model card's hyperparameter and lineage tables (issue 22.3): a parameter set
to null prints as null, and the records of foreach stages (`decontam_set.<name>`, `ingest_source.<name>`)
carry their module's code sha256 like every other stage's."""

from __future__ import annotations

import shutil

from pipeline.core.params import load_params
from pipeline.release import cards
from pipeline.release.inputs import ReleaseInputs
from tests.release_fixture import ROOT

PARAMS = load_params(ROOT / "params.yaml")


def _cells(text: str) -> list[str]:
    return [c.strip() for line in text.splitlines() if line.startswith("|") for c in line.strip("|").split("|")]


def test_hyperparameter_table_has_no_missing_cell_and_prints_null(tmp_path):
    train = PARAMS.section_dump("train")
    assert any(v is None for v in cards._flatten(train).values())   # params.yaml ships a null (torch_threads)
    inp = ReleaseInputs(root=tmp_path, params=PARAMS, lineage={"train": {"params": {"train": train}}},
                        metrics={"train": {"steps": 24, "train_loss": 0.5}})
    text = cards._train_section(inp)
    assert "| `torch_threads` | `null` |" in text
    table = text.split("Every training hyperparameter")[1].split("Training metrics")[0]
    assert not [c for c in _cells(table) if "missing" in c.lower()]


def _run_stage(root, stage, reads, body):
    from pipeline.core.stage import run_stage

    return run_stage(stage, reads, body, params_file=root / "params.yaml", root=root)


def test_foreach_stage_records_carry_their_modules_code(tmp_path, monkeypatch):
    from pipeline.core.imports import code_sha256
    from pipeline.stages import decontam_set

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    shutil.copytree(ROOT / "data", root / "data")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    ctx = _run_stage(root, f"{decontam_set.STAGE}.{decontam_set.OWN}", decontam_set.OWN_READS,
                     decontam_set._body_for(decontam_set.OWN))
    assert ctx.record.code == {"module": "pipeline.stages.decontam_set",
                               "sha256": code_sha256("pipeline.stages.decontam_set")}
    rec = ctx.record.to_dict()
    lineage = {"decontam_set._own": rec, "train": {**rec, "stage": "train"}}
    inp = ReleaseInputs(root=root, params=PARAMS, lineage=lineage)
    from pipeline.release.manifest import ReleaseInfo

    info = ReleaseInfo(version="v1.0.0", model_repo="o/m", dataset_repo="o/d", endpoint="https://h", commit="c" * 40,
                       dirty=False)
    table = cards._lineage_section(inp, info).split("Commit, dirty flag")[0]
    assert "| decontam_set._own | `" in table
    assert not [c for c in _cells(table) if "missing" in c.lower()]


def test_ingest_source_record_carries_its_modules_code(tmp_path, monkeypatch):
    import json

    import yaml

    from pipeline.core.imports import code_sha256
    from pipeline.stages import ingest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "p.jsonl").write_text(json.dumps({"prompt": "Hi there?", "chosen": "Hello.", "rejected": "No."}) + "\n")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["sources"] = [{"name": "p", "format": "pairs", "path": "data/p.jsonl", "license": "MIT"}]
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    ctx = _run_stage(root, f"{ingest.SOURCE_STAGE}.p", ingest.SOURCE_READS, ingest._source_body("p"))
    assert ctx.record.code == {"module": "pipeline.stages.ingest", "sha256": code_sha256("pipeline.stages.ingest")}
