"""Every release gate, each made to fail by its own fixture, and the license derivation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from pipeline.core.errors import GateError
from pipeline.core.params import MetricBound, load_params
from pipeline.release import gates as G
from pipeline.release.gitinfo import code_state
from pipeline.release.inputs import gather
from pipeline.release.licenses import derive
from pipeline.release.publish import dry_run
from pipeline.release.secretscan import scan_folder
from tests.release_fixture import EVAL, EVAL_PROMPTS, _pair, git, make_release_project, write_parquet


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    return make_release_project(tmp_path_factory.mktemp("gates") / "proj", tiny_model_dir)


@pytest.fixture
def inp(project):
    return gather(load_params(project / "params.yaml"), project)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "a.txt").write_text("a\n")
    git(r, "add", "a.txt")
    git(r, "commit", "-qm", "one")
    return r


# -- environment gates --------------------------------------------------------------------------

def test_git_clean_fails_on_uncommitted_change(repo):
    assert G.git_clean(code_state(repo, "v1", "^v")).status == "pass"
    (repo / "a.txt").write_text("changed\n")
    (repo / "new.py").write_text("x = 1\n")
    r = G.git_clean(code_state(repo, "v1", "^v"))
    assert r.status == "fail" and "2 uncommitted change(s) (a.txt, new.py)" in r.detail


def test_git_version_needs_a_tag_or_a_given_version(repo):
    r = G.git_version(code_state(repo, None, "^v[0-9]"), repo)
    assert r.status == "fail" and "has no version tag and no version was given" in r.detail
    git(repo, "tag", "not-a-release")
    assert G.git_version(code_state(repo, None, "^v[0-9]"), repo).status == "fail"
    git(repo, "tag", "v1.0.0")
    state = code_state(repo, None, "^v[0-9]")
    assert state.version == "v1.0.0" and G.git_version(state, repo).status == "pass"
    (repo / "a.txt").write_text("b\n")
    git(repo, "commit", "-qam", "two")
    r = G.git_version(code_state(repo, "v1.0.0", "^v"), repo)
    assert r.status == "fail" and "tag v1.0.0 points at" in r.detail and "not at HEAD" in r.detail


def test_dvc_status_fails_when_a_stage_is_out_of_date(repo):
    env = {"DVC_NO_ANALYTICS": "1", "PATH": ""}
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n")
    r = G.dvc_status(repo)
    assert r.status == "fail" and "1 stage(s) out of date with dvc.lock: s" in r.detail
    (repo / "dvc.yaml").write_text("stages:\n  publish:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n")
    assert G.dvc_status(repo).status == "pass"   # the release's own stages are rebuilt by publish itself


def test_dry_run_warns_on_environment_gates_and_strict_enforces_them(project):
    results = [G.GateResult("git-clean", "fail", "dirty"), G.GateResult("licenses", "fail", "x")]
    soft = G.finalize(results, dry_run=True, strict=False)
    assert [r.status for r in soft] == ["warn", "fail"] and "enforced when publishing" in soft[0].detail
    assert [r.status for r in G.finalize(results, dry_run=True, strict=True)] == ["fail", "fail"]
    assert [r.status for r in G.finalize(results, dry_run=False, strict=False)] == ["fail", "fail"]


# -- data and evaluation gates ------------------------------------------------------------------

def test_validation_gate(inp):
    assert G.validation(inp).status == "pass"
    report = inp.reports["validation"]
    saved = report.read_text()
    try:
        report.write_text(json.dumps({"status": "failed", "error": "3 rows broke required_fields"}))
        r = G.validation(inp)
        assert r.status == "fail" and "says validation failed" in r.detail
    finally:
        report.write_text(saved)
    del inp.lineage["validate"]
    assert "no lineage record for the validate stage" in G.validation(inp).detail


def test_lineage_gate_catches_stale_and_edited_outputs(inp):
    published = {"model": {"config.json": inp.lineage["train"]["outputs"][0]["files"]["config.json"]}}
    assert G.lineage(inp, published).status == "pass"
    inp.lineage["train"]["inputs"][1]["sha256"] = "0" * 64
    r = G.lineage(inp, {"model": {"config.json": "1" * 64}})
    assert r.status == "fail"
    assert "train read outputs/dataset/train.parquet 000000000000 but build last wrote" in r.detail
    assert "models/trained/config.json differs from what train recorded writing" in r.detail
    del inp.lineage["evaluate"]
    assert "no lineage record for stage evaluate" in G.lineage(inp, {}).detail


def test_eval_thresholds(inp):
    ok = {"pass_rate_delta": MetricBound(min=-0.05), "length_ratio": MetricBound(max=2.0)}
    assert G.eval_thresholds(EVAL, ok).status == "pass"
    r = G.eval_thresholds(EVAL | {"length_ratio": 2.5, "kl": math.nan},
                          ok | {"pref_accuracy": MetricBound(min=0.9), "kl": MetricBound(max=1), "nope": MetricBound(min=0)})
    assert r.status == "fail"
    assert r.detail == ("length_ratio = 2.5 > max 2.0; pref_accuracy = 0.6875 < min 0.9; kl is NaN; "
                        "nope is missing from metrics/eval.json")
    assert "metrics/eval.json is missing" in G.eval_thresholds(None, ok).detail


def test_regression_against_a_previous_release(tmp_path):
    tol = {"pref_accuracy": 0.05, "win_rate": 0.05}
    assert G.regression(EVAL, None, None, tol).status == "skip"
    r = G.regression(EVAL, {"pref_accuracy": 0.80, "win_rate": 0.56}, "v0.0.9", tol)
    assert r.status == "fail" and r.detail == "pref_accuracy = 0.6875 regressed from 0.8 in v0.0.9 (tolerance 0.05)"
    assert G.regression(EVAL, {"pref_accuracy": 0.70}, "v0.0.9", tol).status == "pass"


def test_regression_reads_a_previous_bundle_folder(project, tmp_path):
    from pipeline.release.bundle import _previous_eval

    (tmp_path / "old" / "model" / "eval").mkdir(parents=True)
    (tmp_path / "old" / "model" / "eval" / "eval.json").write_text(json.dumps({"pref_accuracy": 0.9}))
    prev = _previous_eval(str(tmp_path / "old"), load_params(project / "params.yaml"))
    assert G.regression(EVAL, prev, "old", {"pref_accuracy": 0.05}).status == "fail"


@pytest.mark.parametrize("prompt,kind", [
    (EVAL_PROMPTS[0].upper(), "exact"),
    ("Please: " + " ".join(EVAL_PROMPTS[1].split()[:14]) + " and more words after it.", "13-gram"),
])
def test_contamination_gate_catches_eval_prompts_in_training(inp, tmp_path, prompt, kind):
    assert G.contamination(inp, 13).status == "pass"
    f = tmp_path / "train.parquet"
    write_parquet(f, [_pair(0, "an unrelated prompt about tea", "train"), _pair(1, prompt, "train")])
    inp.split_files["train"] = f
    r = G.contamination(inp, 13)
    assert r.status == "fail"
    assert "1 training prompt(s) overlap evaluation prompts; first: train id train-1 matches test_prompts" in r.detail
    assert f"({kind})" in r.detail


def test_contamination_gate_needs_an_eval_set(inp, tmp_path):
    inp.params.paths.test_prompts = str(tmp_path / "none.jsonl")
    inp.params.paths.general_prompts = str(tmp_path / "none2.jsonl")
    assert "no evaluation prompt file found" in G.contamination(inp, 13).detail


# -- licenses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lic,expected", [
    ("CC-BY-NC-4.0", "is CC-BY-NC-4.0 (non-commercial) but the release would be Apache-2.0"),
    (None, "license '': no license; its terms are unknown"),
    ("unknown", "license 'unknown': no license; its terms are unknown"),
    ("Foo-1.0", "license 'Foo-1.0': not a valid SPDX license expression (Unknown license key(s): Foo-1.0)"),
    ("MIT OR", "license 'MIT OR': not a valid SPDX license expression"),
    ("LicenseRef-mine", "not a valid SPDX license expression"),
    ("custom", "not a valid SPDX license expression"),
    ("Artistic-2.0", "Artistic-2.0 is SPDX but not classified by this screen"),
    ("GPL-3.0-only", "is GPL-3.0-only (copyleft) but the release would be Apache-2.0, not GPL-3.0-only"),
    ("CC-BY-NC-4.0 AND MIT", "(non-commercial) but the release would be Apache-2.0"),
    ("MIT OR CC-BY-ND-4.0 AND CC-BY-NC-4.0", None),   # OR binds looser: MIT alone is a valid choice
    ("CC-BY-SA-4.0", "(share-alike) but the release would be Apache-2.0"),
    ("CC-BY-ND-4.0", "(no derivatives): a model trained on it cannot be released"),
])
def test_license_conflicts_fail_the_gate(lic, expected):
    d = derive("base", "Apache-2.0", [{"name": "ok", "license": "MIT"}, {"name": "bad", "license": lic}])
    r = G.licenses(d, ["Apache-2.0"])
    if expected is None:
        assert r.status == "pass", r.detail
        return
    assert r.status == "fail" and expected in r.detail and "set card.license_override with a reason" in r.detail, r.detail


@pytest.mark.parametrize("source, base, ok", [
    # non-commercial data: only a non-commercial release
    ("CC-BY-NC-4.0", "Apache-2.0", False), ("CC-BY-NC-4.0", "CC-BY-NC-4.0", True),
    # no-derivatives data: never, whatever the release
    ("CC-BY-ND-4.0", "Apache-2.0", False), ("CC-BY-NC-ND-4.0", "CC-BY-NC-4.0", False),
    # share-alike data: only under that same license
    ("CC-BY-SA-4.0", "Apache-2.0", False), ("CC-BY-SA-4.0", "CC-BY-SA-4.0", True), ("ODbL-1.0", "MIT", False),
    ("CC-BY-NC-SA-4.0", "CC-BY-NC-4.0", False), ("CC-BY-NC-SA-4.0", "CC-BY-NC-SA-4.0", True),
    # copyleft data: only under that same license
    ("GPL-3.0-only", "Apache-2.0", False), ("GPL-3.0-only", "GPL-3.0-only", True), ("AGPL-3.0-only", "GPL-3.0-only", False),
    # expressions: OR is the licensee's choice, AND means all
    ("MIT OR CC-BY-NC-4.0", "Apache-2.0", True), ("MIT AND CC-BY-SA-4.0", "Apache-2.0", False),
    ("mit", "Apache-2.0", True),
])
def test_each_license_rule(source, base, ok):
    d = derive("base", base, [{"name": "src", "license": source}])
    assert d.ok is ok, d.conflicts
    assert (G.licenses(d, [base]).status == "pass") is ok


def test_base_model_license_named_model_licenses_and_unknown():
    from pipeline.release.licenses import hub_metadata, kind

    assert derive("llama", "llama3", [{"name": "a", "license": "MIT"}]).ok and kind("llama3") == "custom"
    bad = derive("x", "my-own-terms", [{"name": "a", "license": "MIT"}])
    assert not bad.ok and "base model x license 'my-own-terms': not a valid SPDX license expression" in bad.conflicts[0]
    assert hub_metadata("Apache-2.0 AND MIT") == {"license": ["apache-2.0", "mit"]}
    assert hub_metadata("GPL-3.0-only") == {"license": "gpl-3.0"}
    assert hub_metadata("MIT OR CC-BY-NC-4.0") == {"license": "other", "license_name": "mit-or-cc-by-nc-4.0"}
    mixed = derive("b", "Apache-2.0", [{"name": "a", "license": "MIT OR CC-BY-NC-4.0"}, {"name": "c", "license": "MIT"}])
    assert mixed.dataset == "MIT AND (MIT OR CC-BY-NC-4.0)"


def test_license_derivation_and_override():
    d = derive("base", "Apache-2.0", [{"name": "a", "license": "MIT"}, {"name": "b", "license": "CC-BY-4.0"}])
    assert d.ok and d.release == "Apache-2.0" and d.dataset == "CC-BY-4.0 AND MIT"
    assert G.licenses(d, ["Apache-2.0"]).status == "pass"
    assert "not in publish.allowed_licenses" in G.licenses(d, ["MIT"]).detail
    nc = derive("base", "Apache-2.0", [{"name": "b", "license": "CC-BY-NC-4.0"}],
                {"license": "CC-BY-NC-4.0", "reason": "research-only release of a non-commercial dataset"})
    assert nc.ok and nc.release == "CC-BY-NC-4.0" and G.licenses(nc, ["CC-BY-NC-4.0"]).status == "pass"
    assert "no data sources are declared" in derive("base", "MIT", []).conflicts[0]


def test_override_reason_is_printed_in_both_cards(project, tmp_path):
    from pipeline.release.bundle import license_decision, release_info
    from pipeline.release.cards import write_cards

    params = load_params(project / "params.yaml")
    reason = "the NC source is kept for a research-only release, agreed with its authors"
    params.card.license_override = {"license": "CC-BY-NC-4.0", "reason": reason}
    inp = gather(params, project)
    write_cards(inp, release_info(params, code_state(project, None, "^v")), license_decision(inp),
                tmp_path / "m", tmp_path / "d")
    for card in (tmp_path / "m" / "README.md", tmp_path / "d" / "README.md"):
        text = card.read_text()
        assert reason in text and "**License override:**" in text
    assert "license: cc-by-nc-4.0" in (tmp_path / "m" / "README.md").read_text()


# -- secrets ------------------------------------------------------------------------------------

def test_secret_scan_finds_tokens_and_keys_in_every_kind_of_file(tmp_path, monkeypatch):
    import tarfile

    import torch
    from safetensors.torch import save_file

    fake = "hf_" + "Ab3" * 12
    monkeypatch.setenv("HF_TOKEN", "plain-looking-value-1234")
    b = tmp_path / "b"
    (b / "model").mkdir(parents=True)
    (b / "model" / "README.md").write_text(f"hello\nuse the token {fake} to download\n")
    block = "-----BEGIN EC " + "PRIVATE KEY-----"  # split so this source file does not trip the scan itself
    (b / "model" / "key.txt").write_text(f"{block}\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n")
    (b / "model" / "notes.json").write_text('{"x": "plain-looking-value-1234"}')
    save_file({"w": torch.zeros(2)}, str(b / "model" / "w.safetensors"), metadata={"note": f"by {fake}"})
    write_parquet(b / "data.parquet", [_pair(0, f"my key is {fake}", "train")])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.py").write_text(f'TOKEN = "{fake}"\n')
    (tmp_path / "src" / "fixture.py").write_text(f'KEY = "{fake}"  # pragma: allowlist secret\n')
    with tarfile.open(b / "src.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "config.py", arcname="proj/config.py")
        tar.add(tmp_path / "src" / "fixture.py", arcname="proj/fixture.py")  # honoured in source code only
    (b / "clean.md").write_text("sha256 " + "ab12" * 16 + " is not a secret\n")
    findings, _ = scan_folder(b)
    text = [str(f) for f in findings]
    assert any(t.startswith("model/README.md:2:") and "Hugging Face token" in t for t in text)
    assert any(t.startswith("model/key.txt:1:") and "Private Key" in t for t in text)
    assert any(t.startswith("model/notes.json:1:") and "value of $HF_TOKEN" in t for t in text)
    assert any(t.startswith("model/w.safetensors (header)") for t in text)
    assert any(t.startswith("data.parquet (text cells)") for t in text)
    assert any(t.startswith("src.tar.gz!proj/config.py") for t in text)
    assert not any(t.startswith(("clean.md", "src.tar.gz!proj/fixture.py")) for t in text)
    assert all(fake not in t and "plain-looking" not in t for t in text)  # findings never echo the secret
    r = G.secrets(findings, [])
    assert r.status == "fail" and r.detail.startswith(f"{len(findings)} possible secret(s) in the bundle")


def test_an_allowlist_pragma_in_dataset_text_is_not_honoured(tmp_path):
    fake = "hf_" + "Zq7" * 12
    b = tmp_path / "b"
    write_parquet(b / "dataset" / "data" / "train.parquet",
                  [_pair(0, f"my key is {fake}  # pragma: allowlist secret", "train")])
    (b / "dataset" / "README.md").write_text(f"an example row: {fake} # pragma: allowlist secret\n")
    text = [str(f) for f in scan_folder(b)[0]]
    assert any(t.startswith("dataset/data/train.parquet (text cells):") and "Hugging Face token" in t for t in text)
    assert any(t.startswith("dataset/README.md:1:") for t in text)


def test_large_files_are_streamed_and_listed_as_scanned_in_part(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.release import secretscan

    monkeypatch.setattr(secretscan, "PATTERN_MAX_BYTES", 4096)
    monkeypatch.setattr(secretscan, "DETECT_SECRETS_MAX_BYTES", 1024)
    monkeypatch.setattr(secretscan, "CHUNK_BYTES", 1000)
    token = "hf_" + "LiveValue" * 4
    monkeypatch.setenv("HF_TOKEN", token)
    b = tmp_path / "b"
    b.mkdir()
    blob = bytearray(b"\0" * 10_000)
    blob[995 : 995 + len(token)] = token.encode()     # across the first chunk boundary
    blob[2000] = ord("\n")
    (b / "weights.bin").write_bytes(bytes(blob))
    (b / "tokenizer.json").write_text('{"v": "' + "a" * 2000 + '"}')
    real = Path.read_bytes

    def whole(self):
        assert self.stat().st_size <= 4096, f"{self} read whole"
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", whole)
    findings, partial = scan_folder(b)
    assert [str(f) for f in findings] == ["weights.bin:1: value of $HF_TOKEN"]
    assert any(p.startswith("weights.bin: 0 MiB unknown binary, searched for token values only") for p in partial)
    assert any(p.startswith("tokenizer.json: 1 KiB, too large for detect-secrets") for p in partial)
    r = G.secrets([], partial)
    assert r.status == "pass" and "2 file(s) scanned only in part: " in r.detail and "weights.bin" in r.detail \
        and "tokenizer.json" in r.detail


# -- the gates stop a bundle --------------------------------------------------------------------

def test_a_failing_gate_stops_the_bundle_and_writes_nothing(project, tmp_path):
    params = load_params(project / "params.yaml")
    params.publish.thresholds = {"pass_rate_delta": MetricBound(min=0.99)}
    out = tmp_path / "release"
    with pytest.raises(GateError, match=r"1 release gate\(s\) failed: eval-thresholds: pass_rate_delta = 0.1667 < min 0.99"):
        dry_run(params, project, out)
    assert not out.exists() and not list(tmp_path.glob(".release*"))


def test_strict_dry_run_enforces_a_clean_tree(project, tmp_path):
    (project / "README.md").write_text("# edited\n")
    try:
        with pytest.raises(GateError, match=r"git-clean: 1 uncommitted change\(s\) \(README.md\)"):
            dry_run(load_params(project / "params.yaml"), project, tmp_path / "r", strict=True)
    finally:
        git(project, "checkout", "README.md")
