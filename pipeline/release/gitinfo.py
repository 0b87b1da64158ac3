"""The code side of a release: the commit, its version tag and a `git archive` of it."""

from __future__ import annotations

import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import SourceError
from pipeline.core.io import atomic_write_bytes


def git(root: Path, *args: str, check: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise SourceError(f"git {' '.join(args)}: {e}") from None
        return None
    if out.returncode != 0:
        if check:
            msg = out.stderr.decode(errors="replace").strip().splitlines()
            raise SourceError(f"git {' '.join(args)} in {root}: {msg[0] if msg else f'exit {out.returncode}'}")
        return None
    return out.stdout.decode(errors="replace").rstrip()  # porcelain lines start with a space


@dataclass
class CodeState:
    commit: str
    dirty: list[str]          # `git status --porcelain` lines (tracked changes and untracked files)
    tags_at_head: list[str]
    version: str
    version_from: str         # given | tag | dev
    remote: str | None

    @property
    def short(self) -> str:
        return self.commit[:12]


def code_state(root: Path, given_version: str | None, tag_pattern: str) -> CodeState:
    """Where the code stands: HEAD, uncommitted changes, and the release version.

    The version is the one given (params or --version), else a tag at HEAD matching `tag_pattern`,
    else `dev-<short commit>` (which the version gate refuses for a real release).
    """
    commit = git(root, "rev-parse", "HEAD")
    status = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=normal") or ""
    tags = sorted((git(root, "tag", "--points-at", "HEAD") or "").split())
    remote = git(root, "remote", "get-url", "origin", check=False)
    if given_version:
        version, how = given_version, "given"
    else:
        matching = [t for t in tags if re.search(tag_pattern, t)]
        version, how = (matching[-1], "tag") if matching else (f"dev-{commit[:12]}", "dev")
    return CodeState(commit=commit, dirty=uncommitted(root, status), tags_at_head=tags,
                     version=version, version_from=how, remote=_strip_credentials(remote))


def uncommitted(root: Path, porcelain_z: str) -> list[str]:
    """`git status` entries ("XY path") that make a tree dirty, by the rule the run records use
    (`pipeline.core.lineage.git_state`): dvc.lock and the outputs it lists do not count, since every
    `dvc repro` rewrites them. Untracked files do count here (the run records ignore them): a release
    must not leave a stray file beside the code it archives unnoticed."""
    from pipeline.core.lineage import dvc_managed_paths, is_managed

    managed = dvc_managed_paths(root)
    out, entries, i = [], porcelain_z.split("\0"), 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        paths = [entry[3:]]
        if entry[0] in "RC":  # a rename or copy: its source path follows as an entry of its own
            paths.append(entries[i])
            i += 1
        if not all(is_managed(p, managed) for p in paths):
            out.append(entry)
    return out


def public_url(remote: str | None) -> str | None:
    """`remote` when it is a URL others can clone (https, ssh, git, or scp-like `user@host:path`); None
    for a local path or file:// URL, which means nothing on another machine."""
    from urllib.parse import urlparse

    if not remote:
        return None
    u = urlparse(remote)
    if u.scheme in ("https", "http", "ssh", "git") and u.hostname:
        return remote
    if not u.scheme and re.fullmatch(r"[\w.-]+@[\w.-]+:[^/].*", remote):
        return remote
    return None


def tag_commit(root: Path, tag: str) -> str | None:
    return git(root, "rev-list", "-n", "1", f"refs/tags/{tag}", check=False)


def _strip_credentials(url: str | None) -> str | None:
    """A remote URL may embed credentials (a user and a token before an @ in its host part): drop them."""
    if not url:
        return url
    return re.sub(r"(?<=://)[^/@]+@", "", url)


def source_archive(root: Path, commit: str, prefix: str, dest: Path) -> Path:
    """`git archive` of `commit` as tar.gz (byte-reproducible for a commit; its id is in the pax header)."""
    try:
        out = subprocess.run(["git", "archive", "--format=tar.gz", f"--prefix={prefix}/", commit], cwd=root,
                             capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"git archive {commit}: {e}") from None
    if out.returncode != 0:
        raise SourceError(f"git archive {commit}: {out.stderr.decode(errors='replace').strip()}")
    return atomic_write_bytes(dest, out.stdout)


def archive_commit(path: Path) -> str | None:
    """The commit id `git archive` recorded in the tarball's pax global header."""
    try:
        with tarfile.open(path) as tar:
            return tar.pax_headers.get("comment")
    except (tarfile.TarError, OSError, EOFError):
        return None
