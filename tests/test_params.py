"""Typed params: every problem is one line naming the key path, the value and what is allowed."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_real_params_yaml_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.base_model.source == "wheel"
    assert params.paths.base_model


def test_unknown_key_names_path(raw):
    raw["base_model"]["licence"] = "MIT"
    with pytest.raises(ParamsError, match=r"base_model\.licence = 'MIT': unknown key"):
        parse_params(raw)


def test_wrong_type_names_value_and_rule(raw):
    raw["tracking"]["connect_timeout_s"] = "soon"
    with pytest.raises(ParamsError, match=r"tracking\.connect_timeout_s = 'soon': Input should be a valid number"):
        parse_params(raw)


def test_out_of_range(raw):
    raw["tracking"]["connect_timeout_s"] = -1
    with pytest.raises(ParamsError, match=r"tracking\.connect_timeout_s = -1: Input should be greater than 0"):
        parse_params(raw)


def test_literal_lists_allowed_values(raw):
    raw["base_model"]["source"] = "ftp"
    with pytest.raises(ParamsError, match=r"base_model\.source = 'ftp': Input should be 'wheel', 'hub' or 'local'"):
        parse_params(raw)


def test_bad_sha256_pattern(raw):
    raw["base_model"]["sha256"] = "abc"
    with pytest.raises(ParamsError, match=r"base_model\.sha256 = 'abc': String should match pattern"):
        parse_params(raw)


def test_hub_revision_must_be_a_commit(raw):
    raw["base_model"]["hub"]["revision"] = "main"
    with pytest.raises(ParamsError, match=r"base_model\.hub\.revision = 'main'"):
        parse_params(raw)


def test_missing_section(raw):
    del raw["paths"]
    with pytest.raises(ParamsError, match=r"paths: required key is missing"):
        parse_params(raw)


def test_chosen_source_block_required(raw):
    raw["base_model"]["source"] = "local"
    raw["base_model"].pop("local", None)
    with pytest.raises(ParamsError, match=r"source is 'local' but the `local` block is missing"):
        parse_params(raw)


def test_message_is_one_line(raw):
    raw["base_model"]["licence"] = "MIT"
    raw["tracking"]["connect_timeout_s"] = 0
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert "\n" not in str(exc.value)
    assert "licence" in str(exc.value) and "connect_timeout_s" in str(exc.value)


def test_validate_and_train_max_length_must_agree(raw):
    raw["validate"]["max_length"] = 1024
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert str(exc.value) == "params.yaml: validate.max_length = 1024 must equal train.dpo.max_length = 512"


def test_invalid_yaml_names_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("paths:\n  a: b\n c: [\n")
    with pytest.raises(ParamsError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(bad)


def test_top_level_must_be_mapping():
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        parse_params(["a"])


def _dvc_stages():
    """Stage name -> its definition (a foreach stage's `do:` body)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: st.get("do", st) for name, st in stages.items()}


def _stage_module(stage: str):
    """(module, READS, argv) of a dvc.yaml stage; a foreach stage runs for its first item."""
    import re

    cmd = _dvc_stages()[stage]["cmd"]
    m = re.search(r"python -m (pipeline\.stages\.\w+)(.*)", cmd)
    module = importlib.import_module(m.group(1))
    raw_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    first = {"data.sources": raw_params["data"]["sources"][0]["name"], "data.decontaminate_against": "x"}
    args = m.group(2).split()
    item = next((v for k, v in first.items() if k in _dvc_stages()[stage].get("params", [])), None)
    args = [item if a == "${item.name}" else a for a in args]
    return module, getattr(module, "DVC_STAGES", {}).get(stage, module.READS), args


@pytest.mark.parametrize("stage", list(_dvc_stages()))
def test_dvc_yaml_lists_exactly_the_params_a_stage_reads(stage):
    from pipeline.core.stage import COMMON_READS

    module, reads, _ = _stage_module(stage)
    assert module.STAGE == stage or stage in getattr(module, "DVC_STAGES", {})
    declared = _dvc_stages()[stage].get("params", [])
    assert sorted(declared) == sorted(set(reads) | set(COMMON_READS))
    params = load_params(ROOT / "params.yaml")
    for key in declared:  # every listed key resolves in the typed params
        if "${key}" not in key:  # a round's own entry (rounds.later.<rk>): tests/test_rounds.py resolves it
            params.section(key)


@pytest.mark.parametrize("stage", list(_dvc_stages()))
def test_typo_stops_every_stage_with_exit_2_and_one_line(stage, raw, tmp_path, monkeypatch, capsys):
    """A typo anywhere in params.yaml stops any stage before it does work."""
    bad = copy.deepcopy(raw)
    bad["tracking"]["experimnet"] = "x"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.chdir(tmp_path)
    module, _, args = _stage_module(stage)
    monkeypatch.setattr("sys.argv", ["x", *args])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if args:  # a stage run for one item reports itself as <stage>.<item>
        stage = err[-1].split(": ")[0]
        assert stage.split(".")[0] in getattr(module, "DVC_STAGES", {}) and "." in stage
    assert err[-1] == f"{stage}: error: {tmp_path / 'params.yaml'}: tracking.experimnet = 'x': unknown key (not allowed here; check spelling)"
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "mlflow.db").exists()
