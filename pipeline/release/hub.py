"""Publishing a bundle to the Hugging Face Hub, and fetching a published release back for audit.

Each repo gets its release in ONE commit (`create_commit` with every operation; the Hub applies a
commit all or nothing) and then a tag named after the version. The dataset goes first, then the model,
whose manifest names the dataset. So a failure midway leaves every repo either untouched or complete,
and a rerun finishes the job: a repo whose version tag already points at identical content is skipped,
a main branch that already holds identical content (committed, but the tag was never made) is tagged
as it is, and a version tag pointing at different content is an error, never overwritten.

The token is read from HF_TOKEN only and passed to the client; it is never logged or written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import GateError, SourceError
from pipeline.core.lineage import sha256_file
from pipeline.release.manifest import DATASET_DIR, HUB_EXTRAS, MODEL_DIR, ReleaseInfo, release_files

log = logging.getLogger(__name__)


@dataclass
class Published:
    repo_id: str
    repo_type: str
    version: str
    commit: str
    action: str  # committed | tagged-existing | already-released

    def line(self) -> str:
        return f"{self.repo_type} {self.repo_id}@{self.version}: {self.action} (commit {self.commit[:12]})"


def token_from_env() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise GateError("HF_TOKEN is not set: publishing needs a Hub write token in the environment "
                        "(never in params or on the command line)")
    return token


def check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise SourceError("HF_HUB_OFFLINE is set, which blocks every Hub request (uploads too); unset it to publish")


def make_api(endpoint: str, token: str | bool | None):
    from huggingface_hub import HfApi

    # token=False, not None: never fall back to a token saved on this machine by `hf auth login`.
    return HfApi(endpoint=endpoint, token=token if token else False, library_name="open-release")


def _hub_error(what: str, e: Exception) -> SourceError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    server = getattr(e, "server_message", None)
    return SourceError(f"{what}: {first}" + (f" ({server.strip()})" if server and server.strip() not in first else ""))


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file, as the Hub reports it for regular (non-LFS) files."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remote_files(api, repo_id: str, repo_type: str, revision: str) -> dict[str, dict[str, Any]]:
    """path -> {blob_id, lfs_sha256, size} for every file at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    out = {}
    for item in api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True):
        if isinstance(item, RepoFile):
            lfs = item.lfs.sha256 if item.lfs else None
            out[item.path] = {"blob_id": item.blob_id, "lfs_sha256": lfs, "size": item.size}
    return out


def content_differences(folder: Path, remote: dict[str, dict[str, Any]]) -> list[str]:
    """How the files at a remote revision differ from `folder` (empty: identical)."""
    local = {p.relative_to(folder).as_posix(): p for p in release_files(folder)}
    diffs = [f"missing on the Hub: {p}" for p in sorted(set(local) - set(remote))]
    diffs += [f"only on the Hub: {p}" for p in sorted(set(remote) - set(local) - HUB_EXTRAS)]
    for rel in sorted(set(local) & set(remote)):
        r = remote[rel]
        same = (r["lfs_sha256"] == sha256_file(local[rel])) if r["lfs_sha256"] else \
            (r["blob_id"] == git_blob_sha1(local[rel]))
        if not same:
            diffs.append(f"differs: {rel}")
    return diffs


def publish_repo(api, repo_id: str, repo_type: str, folder: Path, version: str, private: bool,
                 description: str) -> Published:
    """Make `repo_id` hold exactly `folder` at tag `version`, in one commit; idempotent on rerun."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    what = f"{repo_type} repo {repo_id}"
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        refs = api.list_repo_refs(repo_id, repo_type=repo_type)
        tags = {t.name: t.target_commit for t in refs.tags}
        if version in tags:
            diffs = content_differences(folder, remote_files(api, repo_id, repo_type, tags[version]))
            if diffs:
                raise GateError(f"{what}: tag {version} already exists at {tags[version][:12]} with different "
                                f"content ({diffs[0]}; {len(diffs)} difference(s)); a released version is never "
                                "overwritten: release a new version")
            return Published(repo_id, repo_type, version, tags[version], "already-released")
        head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        remote = remote_files(api, repo_id, repo_type, head) if head else {}
        if head and not content_differences(folder, remote):
            commit, action = head, "tagged-existing"  # an earlier run committed, then stopped before tagging
        else:
            ops: list[Any] = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                              for p in release_files(folder)]
            local = {op.path_in_repo for op in ops}
            ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(set(remote) - local - HUB_EXTRAS)]
            log.info("%s: committing %d file(s) as release %s", what, len(local), version)
            info = api.create_commit(repo_id, ops, repo_type=repo_type, commit_message=f"Release {version}",
                                     commit_description=description, parent_commit=head)
            commit, action = info.oid, "committed"
        api.create_tag(repo_id, tag=version, revision=commit, repo_type=repo_type,
                       tag_message=f"open-release {version}")
    except HfHubHTTPError as e:
        raise _hub_error(f"{what} at {api.endpoint}", e) from None
    except (RuntimeError, OSError) as e:  # the Xet/LFS upload layers raise their own errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{what} at {api.endpoint}: upload failed: {first[:300]}") from None
    return Published(repo_id, repo_type, version, commit, action)


def publish_bundle(bundle: Path, info: ReleaseInfo, private: bool, token: str) -> list[Published]:
    """Dataset first, then model: the model's manifest names the dataset, so it must exist first."""
    from pipeline.release.cards import validate_cards

    check_online()
    # The Hub's card check first: a card it would refuse stops the release before any repo changes.
    validate_cards(bundle / MODEL_DIR / "README.md", bundle / DATASET_DIR / "README.md", info.endpoint)
    api = make_api(info.endpoint, token)
    desc = f"open-release {info.version} from commit {info.commit}"
    return [publish_repo(api, info.dataset_repo, "dataset", bundle / DATASET_DIR, info.version, private, desc),
            publish_repo(api, info.model_repo, "model", bundle / MODEL_DIR, info.version, private, desc)]


def download_repo(endpoint: str, repo_id: str, repo_type: str, revision: str, dest: Path) -> str:
    """Download every file of `repo_id` at `revision` into `dest`; return the resolved commit."""
    from huggingface_hub.errors import HfHubHTTPError

    check_online()
    api = make_api(endpoint, os.environ.get("HF_TOKEN") or False)
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision)
        api.snapshot_download(repo_id, repo_type=repo_type, revision=info.sha, local_dir=dest)
    except HfHubHTTPError as e:
        raise _hub_error(f"{repo_type} repo {repo_id}@{revision} at {endpoint}", e) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    return info.sha


def fetch_json(endpoint: str, repo_id: str, filename: str, revision: str, repo_type: str = "model") -> Any:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    from pipeline.core.io import read_json

    check_online()
    api = make_api(endpoint, os.environ.get("HF_TOKEN") or False)
    try:
        return read_json(api.hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision))
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        raise _hub_error(f"{repo_id}@{revision}/{filename} at {endpoint}", e) from None



def fetch_file(endpoint: str, repo_id: str, filename: str, revision: str, dest: Path,
               repo_type: str = "model") -> Path | None:
    """One file of a repo at `revision`, downloaded under `dest` (its repo path kept); None when absent."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    check_online()
    api = make_api(endpoint, os.environ.get("HF_TOKEN") or False)
    try:
        return Path(api.hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, local_dir=dest))
    except EntryNotFoundError:
        return None
    except HfHubHTTPError as e:
        raise _hub_error(f"{repo_type} repo {repo_id}@{revision}/{filename} at {endpoint}", e) from None


def list_files(endpoint: str, repo_id: str, repo_type: str, revision: str) -> list[str]:
    """Every file path of a repo at `revision`."""
    from huggingface_hub.errors import HfHubHTTPError

    check_online()
    api = make_api(endpoint, os.environ.get("HF_TOKEN") or False)
    try:
        return sorted(remote_files(api, repo_id, repo_type, revision))
    except HfHubHTTPError as e:
        raise _hub_error(f"{repo_type} repo {repo_id}@{revision} at {endpoint}", e) from None
