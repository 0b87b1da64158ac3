"""The dry-run release bundle: layout, manifest, cards, signature, and `openrelease audit` catching tampering."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.core.lineage import sha256_file
from pipeline.core.params import load_params
from pipeline.release import audit
from pipeline.release.gitinfo import archive_commit
from pipeline.release.publish import dry_run
from tests.release_fixture import EVAL, ROOT, VERSION, git, make_release_project


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    return make_release_project(tmp_path_factory.mktemp("rel") / "proj", tiny_model_dir)


@pytest.fixture(scope="module")
def bundle(project):
    out = project / "release"
    b = dry_run(load_params(project / "params.yaml"), project, out)
    return b


@pytest.fixture
def copy(bundle, tmp_path):
    """A private copy of the bundle to tamper with."""
    dest = tmp_path / "release"
    shutil.copytree(bundle.path, dest)
    return dest


def test_layout_is_one_folder_per_repo(bundle):
    model = {p.relative_to(bundle.path / "model").as_posix() for p in (bundle.path / "model").rglob("*") if p.is_file()}
    dataset = {p.relative_to(bundle.path / "dataset").as_posix() for p in (bundle.path / "dataset").rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "manifest.json", "model.sig",
            "signing-key.pub", "bom.cdx.json", "eval/eval.json", f"source/open-release-{VERSION}.tar.gz",
            "plots/train/loss.png", "adapter/adapter_model.safetensors"} <= model
    assert {"README.md", "data/train.parquet", "data/test.parquet", "reports/validation.json",
            "reports/decontamination.json"} <= dataset
    assert not any(p.endswith(".pem") for p in model)  # only the public key is published
    assert "adapter/README.md" not in model            # PEFT's template card is dropped


def test_manifest_lists_every_file_with_sha256(bundle):
    m = json.loads((bundle.path / "model" / "manifest.json").read_text())
    for repo in ("model", "dataset"):
        listed = {f["path"]: f for f in m["files"][repo]}
        on_disk = {p.relative_to(bundle.path / repo).as_posix(): p for p in (bundle.path / repo).rglob("*") if p.is_file()}
        assert set(on_disk) - set(listed) <= {"manifest.json", "model.sig"}
        for rel, f in listed.items():
            assert f["sha256"] == sha256_file(on_disk[rel]) and f["size"] == on_disk[rel].stat().st_size
    assert set(m["lineage"]) == {"base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate"}
    assert m["mlflow"]["train"]["run_id"].endswith("5") and m["runs"]["train"]["git"]["dirty"] is True
    assert m["lineage"]["train"]["mlflow"]["run_id"].endswith("5") and m["runs_missing"] == []
    assert set(m["dvc"]["stages"]) == {"build", "train"} and m["dvc"]["lock_sha256"]
    assert m["code"]["commit"] == bundle.info.commit and m["code"]["dirty"] is False
    assert archive_commit(bundle.path / "model" / m["code"]["archive"]["path"]) == m["code"]["commit"]
    assert m["environment"]["packages"]["torch"].startswith("2.")
    assert m["repos"]["dataset"] == {"repo_id": "open-release/smollm2-135m-dpo-pairs", "repo_type": "dataset",
                                     "revision": VERSION}
    gates = {g["name"]: g["status"] for g in m["gates"]}
    assert gates == {"git-clean": "pass", "git-version": "pass", "dvc-status": "pass", "validation": "pass",
                     "lineage": "pass", "eval-thresholds": "pass", "trivial-floor": "pass", "regression": "skip", "contamination": "pass",
                     "licenses": "pass", "signing-anchor": "warn", "secrets": "pass"}


def test_model_card_sections_and_numbers(bundle):
    from huggingface_hub import ModelCard

    text = (bundle.path / "model" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["open-release/smollm2-135m-dpo-pairs"]
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["Prompt-level strict accuracy, degenerate answers fail"].metric_value == EVAL["pass_rate_policy"]
    assert {r.dataset_revision for r in results.values()} == {VERSION} and card.data.base_model_relation == "finetune"
    # this model's results only: the base model's figure and the difference to it are comparisons in the text
    assert not {EVAL["pass_rate_base"], EVAL["pass_rate_delta"]} & {r.metric_value for r in results.values()}
    assert "n_test_prompts" not in results and "judge_order_consistency" not in results  # counts, diagnostics
    assert "| `n_test_prompts` | held-out constraint prompts evaluated | 36 |" in text
    for section in ("## Intended use", "## Out of scope", "## Training data", "### Decontamination",
                    "## Training procedure", "## Evaluation", "## Plots", "## Limitations", "## License",
                    "## Lineage", "## How to reproduce"):
        assert section in text
    assert "[0.0278, 0.3056]" in text                      # the interval is shown
    assert "![loss](plots/train/loss.png)" in text
    assert "`dpo.beta` | 0.1" in text and "effective (global) batch size: 8" in text
    assert "- precision: fp32 " in text and "- micro-batches: padding-free: the real tokens" in text
    # the card is a DVC output: run ids stay out of it; the manifest carries them (from the run records)
    assert "00000000000000000000000000000005" not in text and "manifest.json`, `runs.train`" in text
    assert "Model Card for Model ID" not in text           # TRL's README is replaced
    ds = (bundle.path / "dataset" / "README.md").read_text()
    assert "| train | 4 |" in ds and "license:\n- apache-2.0\n- mit" in ds


def test_missing_metric_is_shown_missing_never_invented(project, tmp_path):
    from pipeline.release.bundle import license_decision, release_info
    from pipeline.release.cards import model_card
    from pipeline.release.gitinfo import code_state
    from pipeline.release.inputs import gather

    params = load_params(project / "params.yaml")
    inp = gather(params, project)
    inp.metrics["eval"] = {k: v for k, v in EVAL.items() if k != "kl"}
    inp.metrics["train"] = None
    text = str(model_card(inp, release_info(params, code_state(project, None, "^v")), license_decision(inp)))
    assert "| `kl` | estimated KL(this model \\|\\| base) on evaluation prompts | *missing* |" in text
    assert "kl" not in {r.metric_type for r in __import__("huggingface_hub").ModelCard(text).data.eval_results}


def test_fresh_bundle_audits_clean(bundle, project):
    report = audit.check_bundle(bundle.path, repo_root=project)
    assert report.problems == []
    assert any("re-created" in c and "identical" in c for c in report.checked)
    assert "train  mlflow run 00000000000000000000000000000005" in report.tree
    assert "source hh, license MIT" in report.tree and "published as open-release/smollm2-135m-dpo-pairs@v0.1.0" in report.tree


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_audit_catches_a_flipped_weight_byte(copy):
    _flip_byte(copy / "model" / "model.safetensors")
    problems = audit.check_bundle(copy).problems
    assert any("changed since signing: model.safetensors" in p for p in problems)
    assert any(p.startswith("model/model.safetensors: sha256") for p in problems)
    assert any("not the weights the train stage wrote" in p for p in problems)


def test_audit_catches_an_edited_card(copy):
    readme = copy / "model" / "README.md"
    readme.write_text(readme.read_text().replace("| 0.1667 |", "| 0.2667 |"))
    problems = audit.check_bundle(copy).problems
    assert "model card: the evaluation table does not match eval/eval.json" in problems
    assert any("changed since signing: README.md" in p for p in problems)


def test_audit_catches_card_metadata_edited_with_consistent_hashes(copy, project):
    """Even if someone rewrites the manifest hashes, the card numbers and the signature give it away."""
    readme = copy / "model" / "README.md"
    readme.write_text(readme.read_text().replace("value: 0.6875", "value: 0.9875"))
    m = json.loads((copy / "model" / "manifest.json").read_text())
    for f in m["files"]["model"]:
        if f["path"] == "README.md":
            f["sha256"], f["size"] = sha256_file(readme), readme.stat().st_size
    (copy / "model" / "manifest.json").write_text(json.dumps(m))
    problems = audit.check_bundle(copy).problems
    assert ("model card model-index: Preference accuracy of the implicit DPO reward (chosen > rejected) = 0.9875 "
            "but eval/eval.json has 0.6875") in problems
    assert any("changed since signing" in p and "manifest.json" in p for p in problems)


def test_audit_catches_a_changed_dataset(copy):
    from tests.release_fixture import _pair, write_parquet

    write_parquet(copy / "dataset" / "data" / "train.parquet", [_pair(0, "a swapped prompt", "train")])
    problems = audit.check_bundle(copy).problems
    assert any(p.startswith("dataset/data/train.parquet: s") for p in problems)
    assert "dataset/data/train.parquet: not the split the train stage read" in problems
    assert "dataset card: the split sizes do not match the Parquet files" in problems


def test_audit_catches_an_edited_manifest(copy):
    path = copy / "model" / "manifest.json"
    m = json.loads(path.read_text())
    m["code"]["commit"] = "0" * 40
    path.write_text(json.dumps(m))
    problems = audit.check_bundle(copy).problems
    assert any("changed since signing: manifest.json" in p for p in problems)
    assert any(p.startswith("source archive is of commit") for p in problems)


def test_audit_catches_an_extra_file_and_a_foreign_key(copy, tmp_path):
    from pipeline.release.signing import generate_key

    (copy / "dataset" / "data" / "extra.parquet").write_bytes(b"x")
    generate_key(tmp_path / "other.pem")
    problems = audit.check_bundle(copy, public_key=tmp_path / "other.pub").problems
    assert "dataset/data/extra.parquet: present but not in the manifest" in problems
    assert any("signature does not verify: Key mismatch" in p and "verified against the pinned key" in p for p in problems)
    assert any(p.startswith("the signer's key is not the pinned key") for p in problems)


def test_audit_cli_exit_codes(bundle, copy):
    env_py = [sys.executable, "-m", "pipeline.cli", "audit"]
    key = str(bundle.path / "model" / "signing-key.pub")  # a test's stand-in for a key obtained independently
    ok = subprocess.run([*env_py, str(bundle.path), "--public-key", key], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "AUDIT PASSED" in ok.stdout and "lineage:" in ok.stdout and "signer: the pinned key" in ok.stdout
    bare = subprocess.run([*env_py, str(bundle.path)], cwd=ROOT, capture_output=True, text=True)
    assert bare.returncode == 3 and "signer is NOT verified" in bare.stdout, bare.stdout + bare.stderr
    _flip_byte(copy / "model" / "model.safetensors")
    bad = subprocess.run([*env_py, str(copy)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "AUDIT FAILED" in bad.stdout and "model.safetensors" in bad.stdout

def test_audit_of_something_that_is_neither_a_folder_nor_a_repo_id(capsys):
    from pipeline.cli import main

    assert main(["audit", "no/such/thing/here"]) == 1
    assert "not a Hub repo id" in capsys.readouterr().err


def test_private_key_never_leaves_the_key_folder(bundle, project):
    private = (project / ".openrelease" / "keys" / "signing-key.pem").read_bytes()
    body = private.split(b"-----")[2].strip()  # the base64 key material
    for p in bundle.path.rglob("*"):
        if p.is_file():
            assert body[:40] not in p.read_bytes(), p
    assert "signing-key.pem" not in git(project, "ls-files")


def test_signing_key_from_env_and_wrong_key_type(project, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pipeline.core.errors import SourceError
    from pipeline.release.signing import ENV_KEY, generate_key, resolve_key

    generate_key(tmp_path / "ci.pem")
    monkeypatch.setenv(ENV_KEY, str(tmp_path / "ci.pem"))
    key = resolve_key(None, project / ".openrelease" / "keys")
    assert key.origin == "env" and key.public_pem == (tmp_path / "ci.pub").read_bytes()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    monkeypatch.setenv(ENV_KEY, str(tmp_path / "rsa.pem"))
    with pytest.raises(SourceError, match="needs an elliptic-curve key"):
        resolve_key(None, tmp_path)
    monkeypatch.setenv(ENV_KEY, str(tmp_path / "nope.pem"))
    with pytest.raises(SourceError, match=r"nope.pem \(from env\) does not exist"):
        resolve_key(None, tmp_path)


def test_cli_dry_run_to_a_folder_and_gate_failures_one_line_each(project, tmp_path, monkeypatch, capsys):
    import yaml

    from pipeline.cli import main

    monkeypatch.chdir(project)
    assert main(["publish", "--dry-run", "--to", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "PASS licenses: Apache-2.0 (derived)" in out and f"dry run: release {VERSION} written to" in out
    assert (tmp_path / "out" / "model" / "model.sig").is_file() and (tmp_path / "out" / "dataset" / "README.md").is_file()

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["publish"]["thresholds"] = {"pass_rate_delta": {"min": 0.5}, "kl": {"max": 0.01}}
    raw["card"]["license_override"] = None
    raw["publish"]["allowed_licenses"] = ["MIT"]
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["publish", "--dry-run", "--to", str(tmp_path / "out2"), "--params", str(tmp_path / "strict.yaml")]) == 1
    err = capsys.readouterr().err
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 2 and any("eval-thresholds: pass_rate_delta = 0.1667 < min 0.5; kl = 0.0831 > max 0.01" in ln
                                   for ln in fails)
    assert any("licenses: release license Apache-2.0 is not in publish.allowed_licenses" in ln for ln in fails)
    assert "openrelease publish: error: 2 release gate(s) failed: eval-thresholds:" in err
    assert not (tmp_path / "out2").exists()
