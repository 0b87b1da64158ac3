"""Takedowns (issue 25): the takedown file, the drop at ingest, `openrelease trace`, and a release that
proves the removal: trace into a release on the loopback Hub, take down, rebuild, publish the next
version, audit it, trace again. The pipeline stages run as functions on the release fixture's project
(no dvc repro); the hh-rlhf flow skips without ../shared/data."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import DataError, SourceError
from pipeline.core.params import load_params
from pipeline.data.takedowns import canonical_json, load_takedowns, record_sha256
from pipeline.release import trace as T
from pipeline.stages import build, ingest, validate
from tests.conftest import shared_data
from tests.release_fixture import ROOT, _record, git, make_release_project

TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefgh"
MODEL, DATASET = "open-release/smollm2-135m-dpo", "open-release/smollm2-135m-dpo-pairs"
SHA = "a" * 64


def _hh(i: int, text: str | None = None) -> dict:
    q = text or f"How do I plant tree number {i} in a small garden?"
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: Dig a wide hole and water it well, number {i}.",
            "rejected": f"\n\nHuman: {q}\n\nAssistant: No."}


def _as_pairs(rec: dict) -> dict:
    """The same hh record as a TRL pairs record (another layout, so another record sha256)."""
    def msgs(t):
        from pipeline.data.formats.hh_rlhf import parse_transcript
        return parse_transcript(t)
    return {"chosen": msgs(rec["chosen"]), "rejected": msgs(rec["rejected"])}


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _takedowns(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"takedowns": entries}, sort_keys=False))


# ------------------------------------------------------------------------------------------- the file

def test_record_hash_is_canonical_json_of_the_raw_record():
    a = {"chosen": "x", "rejected": "y", "n": 1.5}
    b = json.loads('{"n": 1.5,   "rejected": "y", "chosen": "x"}')
    assert record_sha256(a) == record_sha256(b)
    assert canonical_json(a) == b'{"chosen":"x","n":1.5,"rejected":"y"}'
    assert record_sha256({"t": "é"}) != record_sha256({"t": "e"})


def test_takedown_file_entries_and_one_line_errors(tmp_path):
    f = tmp_path / "takedowns.yaml"
    _takedowns(f, [{"sha256": SHA, "reason": "personal data", "date": "2026-12-01", "reference": "ticket-1"}])
    (t,) = load_takedowns(f, "data/takedowns.yaml")
    assert (t.sha256, t.reason, t.date, t.reference, t.line) == (SHA, "personal data", "2026-12-01", "ticket-1", 2)
    assert load_takedowns(tmp_path / "absent.yaml") == []
    cases = [
        ({"sha256": "abc", "reason": "r", "date": "2026-12-01"},
         r"data/takedowns.yaml:5: takedowns\[1\].sha256: the raw record's sha256 as 64 lowercase hex digits, got 'abc'"),
        ({"sha256": "b" * 64, "date": "2026-12-01"},
         r"data/takedowns.yaml:5: takedowns\[1\].reason: a non-empty reason is required, got None"),
        ({"sha256": "b" * 64, "reason": "r", "date": "yesterday"}, r"takedowns\[1\].date: an ISO date"),
        ({"sha256": "b" * 64, "reason": "r", "date": "2026-12-01", "text": "the removed words"},
         r"takedowns\[1\].text: unknown key .*never holds the removed text"),
        ({"sha256": SHA, "reason": "r", "date": "2026-12-01"}, r"takedowns\[1\].sha256: listed twice \(first at entry 0\)"),
    ]
    for bad, message in cases:
        _takedowns(f, [{"sha256": SHA, "reason": "ok", "date": "2026-12-01"}, bad])
        with pytest.raises(DataError, match=message) as e:
            load_takedowns(f, "data/takedowns.yaml")
        assert "\n" not in str(e.value)


def test_ingest_drops_taken_down_records_in_every_source_and_warns_about_unmatched(tmp_path, caplog):
    from pipeline.core.params import DataParams

    recs = [_hh(i) for i in range(4)]
    _write(tmp_path / "hh.jsonl", recs)
    _write(tmp_path / "dup.jsonl", [_as_pairs(recs[2]), _as_pairs(_hh(9))])
    data = DataParams(**{**load_params(ROOT / "params.yaml").section_dump("data"), "sources": [
        {"name": "hh", "format": "hh-rlhf", "path": "hh.jsonl", "license": "MIT"},
        {"name": "dup", "format": "pairs", "path": "dup.jsonl", "license": "MIT"}]})
    paths = load_params(ROOT / "params.yaml").paths
    out = tmp_path / "ingested"
    out.mkdir()
    counts = ingest.run(data, paths, out, tmp_path)
    assert counts["excluded"]["takedown"] == 0 and counts["rows"] == 6
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert rows[2]["record_sha256"] == [record_sha256(recs[2])]
    assert rows[4]["record_sha256"] == [record_sha256(_as_pairs(recs[2]))]  # another layout: another hash

    _takedowns(tmp_path / paths.takedowns, [
        {"sha256": record_sha256(recs[2]), "reason": "personal data", "date": "2026-12-01"},
        {"sha256": record_sha256(_as_pairs(recs[2])), "reason": "personal data (copy)", "date": "2026-12-01"},
        {"sha256": "c" * 64, "reason": "already gone", "date": "2026-12-02"}])
    caplog.set_level(logging.WARNING)
    counts = ingest.run(data, paths, out, tmp_path)
    assert counts["excluded"] == {"takedown": 2, "by_source": {"hh": 1, "dup": 1}}
    assert counts["rows"] == 4 and counts["takedowns_unmatched"] == 1
    assert [t["matched"] for t in counts["takedowns"]] == [1, 1, 0]
    assert "data/takedowns.yaml: 1 takedown(s) match no record in any source: line 8 cccccccccccc..." in caplog.text
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["hh:1", "hh:2", "hh:4", "dup:2"]  # positions of the others kept
    assert "removed" not in (tmp_path / paths.takedowns).read_text()
    # validate carries the count into its summary, build into metrics/data.json
    (tmp_path / "validated").mkdir()
    summary = validate.run(out / "rows.jsonl", data.sources, load_params(ROOT / "params.yaml").validate_.rows, 0.5,
                           tmp_path / "validated")
    assert summary["excluded"] == {"takedown": 2, "takedown.dup": 1, "takedown.hh": 1}
    # a source folder made under another list is refused by the merge
    src = tmp_path / "src"
    for s in data.sources:
        (src / s.name).mkdir(parents=True)
        ingest.run_source(s, src / s.name, tmp_path, [])
    (tmp_path / "m").mkdir()
    with pytest.raises(SourceError, match=r"data.sources\[hh\]: .* was ingested under another takedown list than "
                                          r"data/takedowns.yaml \(run `dvc repro ingest`\)"):
        ingest.merge(data, src, tmp_path / "m", *ingest.takedowns_of(paths, tmp_path))


def test_takedowns_file_is_a_dvc_dependency_of_every_ingest_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for body in (stages["ingest_source"]["do"], stages["ingest"]):
        assert "${paths.takedowns}" in body["deps"] and "paths.takedowns" in body["params"]
    assert load_takedowns(ROOT / load_params(ROOT / "params.yaml").paths.takedowns) == []  # the committed file
    assert "publish.previous_release" in stages["card"]["params"]


def test_trace_selector_parsing_and_unknown_selector(tmp_path):
    assert T.Selector.parse("hh:12", None).kind == "source_line"
    assert T.Selector.parse(SHA.upper(), None) == T.Selector("sha256", SHA)
    assert T.Selector.parse(None, "  Hello   World ") == T.Selector("text", "hello world")
    for bad in ("hh", "nonsense"):
        with pytest.raises(T.TraceError, match="expected SOURCE:LINE"):
            T.Selector.parse(bad, None)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "trace", "hh:99999"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "openrelease trace: error: source_line 'hh:99999': no ingested row, pair or release holds it "
        "(looked in outputs/ingested/rows.jsonl, outputs/dataset/provenance.parquet)"]


# ------------------------------------------------------------------------------------------- the flow

@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _rebuild(root: Path) -> None:
    """ingest -> validate -> build as the stages do, then the lineage records a release reads (the fixture's
    record writer: train read the splits build wrote, ingest applied the takedowns)."""
    import shutil

    params = load_params(root / "params.yaml")
    p = params.paths
    for d in (p.ingested, p.validated, p.dataset):
        shutil.rmtree(root / d, ignore_errors=True)
        (root / d).mkdir(parents=True)
    counts = ingest.run(params.data, p, root / p.ingested, root)
    validate.run(root / p.ingested / "rows.jsonl", params.data.sources, params.validate_.rows, 0.5, root / p.validated)
    b = params.build.model_copy(update={"test_fraction": 0.2, "batch_size": 16})
    v = params.validate_.model_copy(update={"max_length": 4096, "max_quarantine_fraction": 0.5})
    metrics = build.run(root / p.validated, params.data, b, v, [], None, root / p.dataset, root / p.reports, root)
    (root / p.metrics / "data.json").write_text(json.dumps(metrics))
    commit = git(root, "rev-parse", "HEAD")
    srcs = [s.model_dump(mode="json") for s in params.data.sources]
    _record(root, "ingest", {"data.sources": srcs}, [(s["path"], None) for s in srcs], [(p.ingested, counts["rows"])],
            "2", commit, extra={"takedowns": counts["takedowns"], "counts": counts})
    _record(root, "validate", {}, [(p.ingested, None)], [(p.validated, None)], "3", commit)
    _record(root, "build", {}, [(p.validated, None)], [(p.dataset, None)], "4", commit)
    _record(root, "train", {"train": {"dpo": {"beta": 0.1, "seed": 42}, "global_batch_size": 8}},
            [(p.base_model, None), (f"{p.dataset}/train.parquet", None)], [(p.model, None)], "5", commit,
            extra={"train": {"plan": {"device": "cpu", "precision": "fp32", "packing": True}}})
    _record(root, "evaluate", {"evaluate": {"judge": {"kind": "local", "model": "models/base"}}},
            [(p.model, None), (f"{p.dataset}/test.parquet", None), (p.test_prompts, 2)],
            [(f"{p.metrics}/eval.json", None)], "6", commit)


def _release(root: Path, version: str, server) -> Path:
    from dataclasses import replace

    from pipeline.release import hub
    from pipeline.release.publish import dry_run

    bundle = dry_run(load_params(root / "params.yaml"), root, root / f"release-{version}", version=version)
    hub.publish_bundle(bundle.path, replace(bundle.info, endpoint=server.url), False, TOKEN)
    return bundle.path


def test_release_sections_and_audit_on_a_synthetic_release(tmp_path):
    """The audit's takedown checks and the cards' sections, without building a release (fast)."""
    from pipeline.release.takedowns import HEADING, audit_problems, dataset_section, model_section
    from tests.release_fixture import write_parquet

    removed = {"sha256": SHA, "reason": "licensed passage", "date": "2026-12-01", "reference": None, "matched": 1}
    manifest = {"takedowns": {"applied": [removed], "unchecked": None, "earlier_releases": [
        {"release": f"{MODEL}@v0.1.0", "version": "v0.1.0", "trained_with": {SHA: 2}}]},
        "supersedes": {"release": f"{MODEL}@v0.1.0", "version": "v0.1.0"}}
    model, dataset = tmp_path / "model", tmp_path / "dataset"
    model.mkdir()
    (model / "README.md").write_text(f"# m\n\n{HEADING}\n\n{model_section(manifest)}\n")
    dataset.mkdir()
    (dataset / "README.md").write_text(f"# d\n\n{HEADING}\n\n{dataset_section(manifest)}\n")
    assert "`v0.1.0` (open-release/smollm2-135m-dpo@v0.1.0): `aaaaaaaaaaaaaaaa...` (2 train pair(s))" in \
        model_section(manifest) and "Released weights cannot unlearn" in model_section(manifest)
    clean = [{"id": "hh:1#0>1", "split": "train", "record_sha256": ["b" * 64]}]
    write_parquet(dataset / "data" / "provenance.parquet", clean)
    write_parquet(dataset / "data" / "train.parquet", [{"id": "hh:1#0>1"}])
    problems, notes = audit_problems(manifest, model, dataset)
    assert problems == [] and notes == ["takedowns: none of 1 released pair(s) derives from the 1 removed record(s)"]
    write_parquet(dataset / "data" / "provenance.parquet", [*clean, {"id": "hh:7#0>1", "split": "test",
                                                                     "record_sha256": [SHA]}])
    write_parquet(dataset / "data" / "train.parquet", [{"id": "hh:1#0>1"}, {"id": "hh:9#0>1"}])
    problems, _ = audit_problems(manifest, model, dataset)
    assert problems == [
        "dataset/data/train.parquet: 1 pair(s) without provenance (e.g. hh:9#0>1): their records cannot be checked",
        f"dataset: pair hh:7#0>1 derives from taken-down record {SHA} (licensed passage, 2026-12-01)"]
    (model / "README.md").write_text("# m\n")   # a card that drops the section
    assert "model card: the \"Data removals\" section" in audit_problems(manifest, model, dataset)[0][0]


@pytest.mark.slow
def test_trace_take_down_rebuild_publish_audit_trace_again(tmp_path, tiny_model_dir, online):
    from pipeline.release import audit
    from tests.hub_server import HubServer

    hh_file = shared_data("hh-rlhf", "harmless-base_test.jsonl.gz")
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(40)]
    root = make_release_project(tmp_path / "proj", tiny_model_dir)
    line = 7                              # the record to take down: hh-rlhf line 7 ...
    _write(root / "data/sources/hh.jsonl", raw)
    _write(root / "data/sources/dup.jsonl", [_as_pairs(raw[line - 1])])  # ... copied into a second source
    with HubServer(TOKEN) as server:
        cfg = yaml.safe_load((root / "params.yaml").read_text())
        cfg["data"]["sources"] = [
            {"name": "hh", "format": "hh-rlhf", "path": "data/sources/hh.jsonl", "license": "MIT"},
            {"name": "dup", "format": "pairs", "path": "data/sources/dup.jsonl", "license": "MIT"}]
        cfg["validate"]["max_length"] = cfg["train"]["dpo"]["max_length"] = 4096
        cfg["publish"]["endpoint"] = server.url
        (root / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        evaluation = json.loads((root / "metrics/eval.json").read_text())
        (root / "metrics/eval.json").write_text(json.dumps({**evaluation, "pass_rate_floor": 0.05}))
        git(root, "add", "-A")
        git(root, "commit", "-qm", "hh-rlhf and a copy of one record")
        git(root, "tag", "-f", "v0.1.0")
        _rebuild(root)
        first = _release(root, "v0.1.0", server)
        params = load_params(root / "params.yaml")

        # 1. trace the record into the published release
        before = T.trace(root, params.paths, T.Selector.parse(f"hh:{line}", None), [f"{MODEL}@v0.1.0"], server.url)
        by_id = {r["row_id"]: r for r in before["records"]}
        assert set(by_id) == {f"hh:{line}", "dup:1"}  # the duplicate in the other source is found too
        assert by_id["dup:1"]["match"] == "duplicate" and by_id[f"hh:{line}"]["validate"] == "kept"
        assert by_id[f"hh:{line}"]["build"] == "paired" and by_id["dup:1"]["build"] == "filtered:exact_duplicate"
        assert set(before["record_sha256"]) == {record_sha256(raw[line - 1]), record_sha256(_as_pairs(raw[line - 1]))}
        (rel,) = before["releases"]
        assert rel["version"] == "v0.1.0" and rel["pairs"] and [p["id"].split("#")[0] for p in rel["pairs"]] == [f"hh:{line}"]
        by_text = T.trace(root, params.paths, T.Selector.parse(None, raw[line - 1]["chosen"].split("Assistant:")[-1]),
                          [str(first)], server.url)
        assert {r["row_id"] for r in by_text["records"]} >= {f"hh:{line}"} and by_text["releases"][0]["pairs"]

        # 2. take it down (both copies), name the release it supersedes, rebuild
        _takedowns(root / "data/takedowns.yaml", [
            {"sha256": s, "reason": "personal data, removal requested", "date": "2026-12-01", "reference": "ticket-7"}
            for s in before["record_sha256"]])
        cfg["publish"]["previous_release"] = f"{MODEL}@v0.1.0"
        (root / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        git(root, "add", "-A")
        git(root, "commit", "-qm", "take down hh line 7")
        git(root, "tag", "v0.2.0")
        _rebuild(root)
        data = json.loads((root / "metrics/data.json").read_text())
        assert data["excluded.takedown"] == 2 and data["excluded.takedown.hh"] == 1 and data["rows_unaccounted"] == 0

        # 3. publish the next version and audit it from the Hub
        second = _release(root, "v0.2.0", server)
        manifest = json.loads((second / "model/manifest.json").read_text())
        assert manifest["supersedes"]["release"] == f"{MODEL}@v0.1.0" and manifest["supersedes"]["version"] == "v0.1.0"
        applied = manifest["takedowns"]["applied"]
        assert {t["sha256"] for t in applied} == set(before["record_sha256"]) and all(t["matched"] == 1 for t in applied)
        assert raw[line - 1]["chosen"][20:60] not in json.dumps(manifest)   # hashes and reasons, never content
        (earlier,) = manifest["takedowns"]["earlier_releases"]
        assert earlier["version"] == "v0.1.0" and list(earlier["trained_with"]) in ([record_sha256(raw[line - 1])], [])
        ds_card = (second / "dataset/README.md").read_text()
        model_card = (second / "model/README.md").read_text()
        assert "## Data removals" in ds_card and record_sha256(raw[line - 1]) in ds_card
        assert "supersedes `open-release/smollm2-135m-dpo@v0.1.0`" in ds_card
        if earlier["trained_with"]:  # hh line 7 fell in the train split of v0.1.0
            assert "Released weights cannot unlearn" in model_card and "- `v0.1.0`" in model_card
        report = audit.audit(MODEL, revision="v0.2.0", endpoint=server.url, repo_root=root)
        assert report.problems == [], report.problems
        assert any(c.startswith("takedowns: none of") for c in report.checked)

        # 4. trace again: the old release contains it, the new one does not
        after = T.trace(root, params.paths, T.Selector.parse(record_sha256(raw[line - 1]), None),
                        [f"{MODEL}@v0.1.0", f"{MODEL}@v0.2.0"], server.url)
        old, new = after["releases"]
        assert old["pairs"] and not new["pairs"] and after["records"] == [] and after["pairs"] == []
        # the copy in the other source was found by its text, which is gone now: the hash traces itself only
        assert new["takedowns_listed"] == [record_sha256(raw[line - 1])] and new["supersedes"] == f"{MODEL}@v0.1.0"
        assert [e["sha256"] for e in after["excluded"]] == [record_sha256(raw[line - 1])]
        again = T.trace(root, params.paths, T.Selector.parse(f"hh:{line}", None), [str(first), str(second)])
        assert again["releases"][0]["pairs"] and not again["releases"][1]["pairs"]

    # 5. the audit fails a release whose data still holds a record its manifest or card lists as removed
    from pipeline.release.takedowns import audit_problems

    stale = json.loads((first / "model/manifest.json").read_text())
    stale["takedowns"] = manifest["takedowns"]
    problems, _ = audit_problems(stale, first / "model", first / "dataset")
    assert any(p.startswith(f"dataset: pair hh:{line}#") and "derives from taken-down record" in p for p in problems)
    assert any("dataset card: the \"Data removals\" section" in p for p in problems)
    edited = second / "dataset/README.md"
    edited.write_text(ds_card.replace("ticket-7", "ticket-8"))
    problems, _ = audit_problems(manifest, second / "model", second / "dataset")
    assert problems == ["dataset card: the \"Data removals\" section is not what the manifest's takedowns render to"]
