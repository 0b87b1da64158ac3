"""The cards' audit commands work as printed (issue 23.7): they install openrelease at the release tag and
name a trust anchor, and the printed `openrelease audit` passes on a built release. Two substitutions make
them runnable offline, and only these: the Hub repo id is replaced by the bundle folder (the card says a
download is audited the same way) and the clone URL by the local repository; `pip install` is not run
(it would change the test's environment), only checked to install this project at the tag."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from pipeline.core.params import load_params
from pipeline.release import signing
from pipeline.release.publish import dry_run
from tests.release_fixture import ROOT, VERSION, git, make_release_project

URL = "https://example.org/org/open-release.git"


def _verify_block(card: str) -> list[str]:
    """The command lines of the fenced block after "Verify what you downloaded"."""
    after = card.split("Verify what you downloaded", 1)[1]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    return [ln.split("   #")[0].strip() for ln in block.splitlines() if ln.strip()]


def _run_audit(line: str, model_repo: str, bundle, cwd) -> subprocess.CompletedProcess:
    line = line.replace(f"{model_repo} --revision {VERSION}", str(bundle))
    argv = shlex.split(line)
    assert argv[0] == "openrelease"
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def unkeyed(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("card-cmd")
    root = make_release_project(base / "proj", tiny_model_dir)
    params = load_params(root / "params.yaml")
    return root, dry_run(params, root, root / "release"), params


def test_without_a_committed_key_the_card_asks_for_the_publishers_key_and_its_command_passes(unkeyed, tmp_path):
    root, bundle, params = unkeyed
    card = (bundle.path / "model" / "README.md").read_text()
    lines = _verify_block(card)
    install, audit_line = lines
    # no public remote: openrelease comes from the release's own source archive, at the release commit
    assert install == (f"tar xzf source/open-release-{VERSION}.tar.gz && pip install ./open-release-{VERSION}")
    with tarfile.open(bundle.path / "model" / "source" / f"open-release-{VERSION}.tar.gz") as t:
        t.extractall(tmp_path / "src", filter="data")
    # the archive is the repository at the release commit (the fixture's repo has params.yaml but no
    # package); this project's own pyproject.toml is what `pip install` reads there
    assert (tmp_path / "src" / f"open-release-{VERSION}" / "params.yaml").is_file()
    assert 'openrelease = "pipeline.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert audit_line == f"openrelease audit {params.publish.model_repo} --revision {VERSION} --public-key publisher.pub"
    assert "obtained from a channel you trust" in card and "signing.public_key_sha256" in card
    # the publisher's key, got elsewhere: here the key the build signed with
    shutil.copy(bundle.path / "model" / signing.PUBLIC_KEY_FILE, tmp_path / "publisher.pub")
    out = _run_audit(audit_line, params.publish.model_repo, bundle.path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "AUDIT PASSED" in out.stdout
    ds = (bundle.path / "dataset" / "README.md").read_text()
    assert _verify_block(ds) == lines   # the dataset card prints the same steps


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model_dir):
    """The key committed at publish.public_key and a public code URL: the --repo-key steps."""
    base = tmp_path_factory.mktemp("card-cmd-keyed")
    root = make_release_project(base / "proj", tiny_model_dir)
    signing.generate_key(base / "secret" / "release.pem")
    (root / "keys").mkdir()
    shutil.copy(base / "secret" / "release.pub", root / "keys" / "release.pub")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["publish"].update(public_key="keys/release.pub", signing_key=str(base / "secret" / "release.pem"))
    raw["card"]["code_repo_url"] = URL
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "commit the release signing public key")
    git(root, "tag", "-f", VERSION)
    params = load_params(root / "params.yaml")
    return root, dry_run(params, root, root / "release"), params


def test_with_a_committed_key_the_card_clones_at_the_tag_installs_and_audits_with_repo_key(keyed, tmp_path):
    root, bundle, params = keyed
    card = (bundle.path / "model" / "README.md").read_text()
    clone_line, install, audit_line = _verify_block(card)
    assert clone_line == f"git clone {URL} open-release && cd open-release && git checkout {VERSION}"
    assert install == "python -m venv .venv && . .venv/bin/activate && pip install ."
    assert audit_line == f"openrelease audit {params.publish.model_repo} --revision {VERSION} --repo-key"
    assert "`keys/release.pub` as committed in the code repository" in card
    # the clone line, with the local repository for the URL
    subprocess.run(["bash", "-c", clone_line.replace(URL, str(root))], cwd=tmp_path, check=True,
                   capture_output=True)
    out = _run_audit(audit_line, params.publish.model_repo, bundle.path, tmp_path / "open-release")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "AUDIT PASSED" in out.stdout and "keys/release.pub" in out.stdout
