"""The audit's trust anchors, the key-swap attack, malformed manifests, hidden files and key hygiene."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from pipeline.core.lineage import sha256_file
from pipeline.core.params import load_params
from pipeline.release import audit, signing
from pipeline.release.manifest import file_entries
from pipeline.release.publish import dry_run
from pipeline.release.trust import EXIT_FAILED, EXIT_PASSED, EXIT_UNANCHORED, Anchor
from tests.release_fixture import ROOT, VERSION, git, make_release_project

REPO_KEY = "keys/release-signing.pub"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model_dir):
    """A project whose signing key lives outside it (publish.signing_key) with its public key committed at
    publish.public_key and tagged: what a maintainer sets up once."""
    base = tmp_path_factory.mktemp("trust")
    root = make_release_project(base / "proj", tiny_model_dir)
    signing.generate_key(base / "secret" / "release.pem")
    (root / "keys").mkdir()
    shutil.copy(base / "secret" / "release.pub", root / REPO_KEY)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["publish"]["public_key"] = REPO_KEY
    raw["publish"]["signing_key"] = str(base / "secret" / "release.pem")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "commit the release signing public key")
    git(root, "tag", "-f", VERSION)
    bundle = dry_run(load_params(root / "params.yaml"), root, root / "release")
    return root, bundle, base


@pytest.fixture
def copy(keyed, tmp_path):
    dest = tmp_path / "release"
    shutil.copytree(keyed[1].path, dest)
    return dest


def test_the_repo_key_gate_passes_and_the_manifest_names_the_path(keyed):
    _, bundle, _ = keyed
    gates = {g["name"]: g for g in bundle.manifest["gates"]}
    assert gates["signing-anchor"]["status"] == "pass" and REPO_KEY in gates["signing-anchor"]["detail"]
    assert bundle.manifest["signing"]["repo_public_key"] == REPO_KEY


def test_each_anchor_passes_a_genuine_release_and_says_which_it_used(keyed):
    root, bundle, base = keyed
    pinned = audit.check_bundle(bundle.path, anchor=Anchor(public_key=base / "secret" / "release.pub"))
    assert pinned.problems == [] and audit.exit_code(pinned) == EXIT_PASSED
    assert pinned.anchor.startswith(f"the pinned key {base / 'secret' / 'release.pub'} (sha256 ")
    repo = audit.check_bundle(bundle.path, anchor=Anchor(repo_key=True, clone=root))
    assert repo.problems == [] and audit.exit_code(repo) == EXIT_PASSED
    assert f"the key committed at {REPO_KEY} in {root} at tag {VERSION}" in repo.anchor


def test_no_anchor_is_signature_valid_signer_not_verified_exit_3(keyed):
    _, bundle, base = keyed
    report = audit.check_bundle(bundle.path)
    fp = signing.public_key_fingerprint((base / "secret" / "release.pub").read_bytes())
    assert report.problems == [] and report.anchor is None and audit.exit_code(report) == EXIT_UNANCHORED
    assert any(c.startswith(f"signature valid, signer NOT verified: the key (sha256 {fp})") for c in report.checked)


def _key_swap_attack(bundle, tmp_path):
    """Flip a weight byte, rewrite every hash of it in the manifest, make a new key pair and re-sign."""
    model = bundle / "model"
    weights = model / "model.safetensors"
    old = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    new = sha256_file(weights)
    text = (model / "manifest.json").read_text().replace(old, new)   # files entry and lineage records alike
    signing.generate_key(tmp_path / "attacker.pem")
    attacker = signing.resolve_key(str(tmp_path / "attacker.pem"), tmp_path)
    shutil.copy(tmp_path / "attacker.pub", model / signing.PUBLIC_KEY_FILE)
    m = json.loads(text)
    m["signing"]["public_key_sha256"] = attacker.fingerprint
    for f in m["files"]["model"]:
        f["sha256"], f["size"] = sha256_file(model / f["path"]), (model / f["path"]).stat().st_size
    (model / "manifest.json").write_text(json.dumps(m))
    signing.sign_folder(model, attacker)
    return attacker


def test_the_key_swap_attack_is_refused_by_a_pinned_key_and_by_the_repo_key(keyed, copy, tmp_path):
    root, _, base = keyed
    attacker = _key_swap_attack(copy, tmp_path)
    bare = audit.check_bundle(copy)
    # Everything is consistent with the attacker's own key: only an anchor can tell.
    assert bare.problems == [] and audit.exit_code(bare) == EXIT_UNANCHORED
    assert any(f"signer NOT verified: the key (sha256 {attacker.fingerprint})" in c for c in bare.checked)
    for anchor in (Anchor(public_key=base / "secret" / "release.pub"), Anchor(repo_key=True, clone=root)):
        report = audit.check_bundle(copy, anchor=anchor)
        assert audit.exit_code(report) == EXIT_FAILED and report.anchor is None
        assert any(p.startswith("signature does not verify") for p in report.problems), report.problems
        assert any(p.startswith("the signer's key is not ") for p in report.problems)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "audit", str(copy), "--repo-key", "--clone", str(root)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "AUDIT FAILED" in r.stdout and "Traceback" not in r.stderr


def test_repo_key_needs_a_clone_with_the_tag_at_the_manifest_commit(keyed, tmp_path):
    root, bundle, _ = keyed
    none = audit.check_bundle(bundle.path, anchor=Anchor(repo_key=True, clone=tmp_path))
    assert any("needs a clone of the code repository" in p for p in none.problems)
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    git(other, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    git(other, "tag", VERSION)
    wrong = audit.check_bundle(bundle.path, anchor=Anchor(repo_key=True, clone=other))
    assert any(f"tag {VERSION} in {other} is commit" in p for p in wrong.problems)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(bundle.path, elsewhere)
    m = json.loads((elsewhere / "model" / "manifest.json").read_text())
    m["signing"]["repo_public_key"] = "params.yaml"   # any other committed file: refused, whatever it holds
    (elsewhere / "model" / "manifest.json").write_text(json.dumps(m))
    assert any(f"the manifest names params.yaml but params.yaml at tag {VERSION} sets publish.public_key to "
               f"'{REPO_KEY}'" in p for p in audit.check_bundle(elsewhere, anchor=Anchor(repo_key=True, clone=root)).problems)
    unkeyed = tmp_path / "unkeyed"
    shutil.copytree(bundle.path, unkeyed)
    m = json.loads((unkeyed / "model" / "manifest.json").read_text())
    m["signing"]["repo_public_key"] = None
    (unkeyed / "model" / "manifest.json").write_text(json.dumps(m))
    assert any("the manifest names no public key committed" in p
               for p in audit.check_bundle(unkeyed, anchor=Anchor(repo_key=True, clone=root)).problems)


def test_signing_anchor_gate_fails_when_the_committed_key_is_another(tmp_path):
    from pipeline.release import gates as G

    assert G.signing_anchor("key", REPO_KEY, b"other", b"mine").status == "fail"
    assert "not committed at HEAD" in G.signing_anchor("key", REPO_KEY, None, b"mine").detail
    assert G.signing_anchor("key", None, None, b"mine").status == "warn"
    assert G.signing_anchor("key", REPO_KEY, b"mine", b"mine").status == "pass"


@pytest.mark.parametrize("mangle, reason", [
    (lambda t: t[: len(t) // 2], "manifest.json unreadable"),
    (lambda t: "[1, 2]", "a JSON object expected, got list"),
    (lambda t: json.dumps({**json.loads(t), "files": {"model": "x", "dataset": []}}), "files.model must be a list"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "code"}), "key 'code' is missing"),
    (lambda t: json.dumps({**json.loads(t), "files": {"model": [{"path": "a", "sha256": 1, "size": "9"}],
                                                    "dataset": []}}), "files.model[0] must be"),
    (lambda t: json.dumps({**json.loads(t), "lineage": {"train": {"outputs": [{"sha256": "x"}]}}}),
     "lineage.train must hold"),
    (lambda t: json.dumps({**json.loads(t), "repos": {"model": {}}}), "repos.model must name"),
])
def test_a_malformed_manifest_is_audit_failed_with_reasons_never_a_traceback(copy, mangle, reason):
    path = copy / "model" / "manifest.json"
    path.write_text(mangle(path.read_text()))
    problems = audit.check_bundle(copy).problems
    assert any(reason in p for p in problems), problems
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "audit", str(copy)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "AUDIT FAILED" in r.stdout and reason in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_hidden_files_are_listed_and_an_extra_one_fails_the_audit(copy, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / ".hidden").write_text("x")
    (tmp_path / "f" / "sub" / ".deep").parent.mkdir()
    (tmp_path / "f" / "sub" / ".deep").write_text("y")
    assert [e["path"] for e in file_entries(tmp_path / "f")] == [".hidden", "sub/.deep"]
    (copy / "model" / ".config").write_text("planted")
    (copy / "dataset" / "data" / ".extra.parquet").write_bytes(b"planted")
    problems = audit.check_bundle(copy).problems
    assert "model/.config: present but not in the manifest" in problems
    assert "dataset/data/.extra.parquet: present but not in the manifest" in problems
    assert any("not signed: .config" in p for p in problems)


def test_cli_anchor_arguments(copy, capsys):
    from pipeline.cli import main

    assert main(["audit", str(copy), "--identity", "https://github.com/o/r/.github/workflows/release.yml@refs/tags/v1"]) == 2
    assert "needs both --identity and --issuer" in capsys.readouterr().err
    assert main(["audit", str(copy), "--public-key", "k.pub", "--repo-key"]) == 2
    assert "give one trust anchor, not --public-key and --repo-key" in capsys.readouterr().err


# -- keyless Sigstore: as far as it goes offline ---------------------------------------------------------

ISSUER = signing.GITHUB_ISSUER
IDENTITY = "https://github.com/open-release/open-release/.github/workflows/release.yml@refs/tags/v0.1.0"


def test_sigstore_unreachable_is_a_clear_error(copy, monkeypatch):
    """Without network (forced: a proxy nothing listens on) the trust root cannot be fetched."""
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    report = audit.check_bundle(copy, anchor=Anchor(identity=IDENTITY, issuer=ISSUER))
    assert any(p.startswith("Sigstore trust root unavailable (TUFError") and "--sigstore-trust-config" in p
               for p in report.problems), report.problems
    assert audit.exit_code(report) == EXIT_FAILED


def _offline_trust_config(tmp_path):
    """A ClientTrustConfig from the production trust root that sigstore-python ships (no network)."""
    import sigstore

    store = os.path.join(os.path.dirname(sigstore.__file__), "_store", "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev")
    with open(os.path.join(store, "trusted_root.json")) as f, open(os.path.join(store, "signing_config.v0.2.json")) as g:
        cfg = {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
               "trustedRoot": json.load(f), "signingConfig": json.load(g)}
    (tmp_path / "trust.json").write_text(json.dumps(cfg))
    return tmp_path / "trust.json"


def test_sigstore_verifier_is_built_offline_and_refuses_a_key_signed_release(copy, tmp_path):
    trust = _offline_trust_config(tmp_path)
    config = signing.sigstore_verifier(IDENTITY, ISSUER, trust)
    assert type(config._verifier).__module__ == "model_signing._signing.sign_sigstore"
    assert config._verifier._policy._identity == IDENTITY and config._verifier._policy._issuer._value == ISSUER
    report = audit.check_bundle(copy, anchor=Anchor(identity=IDENTITY, issuer=ISSUER, trust_config=trust))
    assert any(p.startswith(f"keyless signature does not verify for identity {IDENTITY} from {ISSUER}")
               for p in report.problems), report.problems
    with pytest.raises(audit.AuditError, match="no Sigstore trust config file"):
        signing.sigstore_verifier(IDENTITY, ISSUER, tmp_path / "missing.json")


def test_a_keyless_release_asks_for_identity_and_issuer(copy):
    m = json.loads((copy / "model" / "manifest.json").read_text())
    m["signing"]["method"] = "sigstore (keyless)"
    (copy / "model" / "manifest.json").write_text(json.dumps(m))
    assert "this release is signed keyless (Sigstore): verify it with --identity and --issuer" in \
        audit.check_bundle(copy).problems


def test_sigstore_signing_without_network_or_identity_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.core.errors import SourceError

    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "SIGSTORE_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.txt").write_text("x")
    monkeypatch.setenv(signing.ENV_METHOD, "sigstore")
    assert signing.signing_method() == "sigstore"
    with pytest.raises(SourceError, match=r"Sigstore keyless signing failed .*id-token: write"):
        signing.sign_folder_sigstore(tmp_path / "m")
    monkeypatch.setenv(signing.ENV_METHOD, "pgp")
    with pytest.raises(SourceError, match="expected `key` or `sigstore`"):
        signing.signing_method()


# -- key and path hygiene --------------------------------------------------------------------------------

def test_a_generated_private_key_is_0600_even_mid_write(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        if str(dst).endswith(".pem"):
            seen.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old = os.umask(0)  # the most permissive umask must not loosen it
    try:
        signing.generate_key(tmp_path / "keys" / "k.pem")
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "k.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert not list((tmp_path / "keys").glob(".*tmp"))


def test_the_manifest_names_no_key_path_and_no_absolute_local_path(keyed, tiny_model_dir):
    import os.path

    root, bundle, base = keyed
    text = (bundle.path / "model" / "manifest.json").read_text()
    for local in (str(root), str(base), str(tiny_model_dir), os.path.expanduser("~"), "release.pem", "signing-key.pem"):
        assert local not in text, local
    strings = []

    def walk(v):
        if isinstance(v, dict):
            [walk(x) for x in v.values()]
        elif isinstance(v, list):
            [walk(x) for x in v]
        elif isinstance(v, str):
            strings.append(v)
    walk(json.loads(text))
    assert not [s for s in strings if s.startswith(("/", "~", "file:/"))]
    assert "signing_key" not in json.loads(text)["params"]["publish"]
    assert "<local>/config.json" in text   # the fixture's base model file outside the project, named only


def test_published_eval_prompts_are_what_evaluate_read(copy):
    from tests.release_fixture import EVAL_PROMPTS

    ev = copy / "dataset" / "eval" / "test_prompts" / "test.jsonl"
    assert [json.loads(ln)["prompt"] for ln in ev.read_text().splitlines()] == EVAL_PROMPTS
    assert audit.check_bundle(copy).problems == []
    ev.write_text(ev.read_text().replace("sea", "moon"))
    m = json.loads((copy / "model" / "manifest.json").read_text())
    for f in m["files"]["dataset"]:   # even with the manifest's hash rewritten to match
        if f["path"] == "eval/test_prompts/test.jsonl":
            f["sha256"], f["size"] = sha256_file(ev), ev.stat().st_size
    (copy / "model" / "manifest.json").write_text(json.dumps(m))
    assert "dataset/eval/test_prompts/test.jsonl: not the prompts the evaluate stage read" in \
        audit.check_bundle(copy).problems
