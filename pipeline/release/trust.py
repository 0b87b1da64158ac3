"""Trust anchors for `openrelease audit`: what the release's signer is verified against, and the
manifest's structure checked before anything in it is believed.

A signature checked against a key that came inside the same download proves only that someone signed
it. So the audit verifies the signer against one anchor the user holds outside the bundle:

- `--public-key FILE`: a key obtained independently (pinned);
- `--repo-key`: the public key committed in the code repository at the release tag (the manifest
  names its repo-relative path, `publish.public_key`), read with `git show` from a clone, never from the
  bundle's copy or its source archive (which the same attacker could rewrite);
- `--identity` + `--issuer`: keyless Sigstore signing in CI, the certificate naming the workflow.

Without one, a valid signature is reported as "signature valid, signer NOT verified" with the key's
full sha256, and the audit exits 3.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import AuditError
from pipeline.release.manifest import DATASET_DIR, MODEL_DIR, SCHEMA

EXIT_PASSED, EXIT_FAILED, EXIT_UNANCHORED = 0, 1, 3


class AuditUsageError(AuditError):
    """Audit arguments that contradict each other."""

    exit_code = 2


@dataclass
class Anchor:
    """What the signer is checked against; never something that came inside the bundle."""

    public_key: Path | None = None          # --public-key: a PEM key the user pinned
    repo_key: bool = False                  # --repo-key: the key committed in the code repo at the release tag
    clone: Path | None = None               # the clone --repo-key reads (and the source archive is re-made from)
    identity: str | None = None             # --identity / --issuer: keyless Sigstore signer
    issuer: str | None = None
    trust_config: Path | None = None        # --sigstore-trust-config: an offline Sigstore trust root


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def manifest_problems(m: Any) -> list[str]:
    """Every way the manifest's structure is not what the audit reads (reported, never a traceback)."""
    if not isinstance(m, dict):
        return [f"manifest.json: a JSON object expected, got {type(m).__name__}"]
    out = []
    if m.get("schema") != SCHEMA:
        out.append(f"manifest.json: schema is {m.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("version", str), ("files", dict), ("code", dict), ("signing", dict), ("repos", dict),
                      ("lineage", dict), ("params", dict)):
        if key not in m:
            out.append(f"manifest.json: key {key!r} is missing")
        elif not isinstance(m[key], kind):
            out.append(f"manifest.json: {key!r} must be {kind.__name__}, got {type(m[key]).__name__}")
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    for repo in (MODEL_DIR, DATASET_DIR):
        entries = files.get(repo)
        if not isinstance(entries, list):
            out.append(f"manifest.json: files.{repo} must be a list")
            continue
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and _str(e.get("path")) and isinstance(e.get("size"), int)
                    and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64):
                out.append(f"manifest.json: files.{repo}[{i}] must be {{path, sha256 (64 hex), size (int)}}, got {e!r:.120}")
            elif e["path"].startswith("/") or ".." in e["path"].split("/"):
                out.append(f"manifest.json: files.{repo}[{i}].path {e['path']!r} leaves the repo folder")
    code = m.get("code") if isinstance(m.get("code"), dict) else {}
    if not _str(code.get("commit")):
        out.append("manifest.json: code.commit must be a string")
    if not (isinstance(code.get("archive"), dict) and _str(code["archive"].get("path"))):
        out.append("manifest.json: code.archive.path must be a string")
    lineage = m.get("lineage") if isinstance(m.get("lineage"), dict) else {}
    for stage, rec in lineage.items():
        arts = [*(rec.get("inputs") or []), *(rec.get("outputs") or [])] if isinstance(rec, dict) else None
        if arts is None or not all(isinstance(a, dict) and _str(a.get("path")) and isinstance(a.get("sha256"), str)
                                   for a in arts):
            out.append(f"manifest.json: lineage.{stage} must hold inputs/outputs of {{path, sha256}}")
    repos = m.get("repos") if isinstance(m.get("repos"), dict) else {}
    for r in (MODEL_DIR, DATASET_DIR):
        if not (isinstance(repos.get(r), dict) and _str(repos[r].get("repo_id")) and _str(repos[r].get("revision"))):
            out.append(f"manifest.json: repos.{r} must name repo_id and revision")
    return out


def repo_key(manifest: dict[str, Any], clone: Path | None) -> tuple[bytes, str]:
    """The public key committed in the code repository at the release tag, read from a clone."""
    import subprocess

    rel = (manifest.get("signing") or {}).get("repo_public_key")
    if not _str(rel):
        raise AuditError("--repo-key: the manifest names no public key committed in the code repository "
                         "(publish.public_key was not set when it was built)")
    if clone is None or not (clone / ".git").exists():
        raise AuditError("--repo-key needs a clone of the code repository (--clone DIR, or run inside one); "
                         "the bundle's own source archive cannot vouch for itself")
    commit, version = manifest["code"]["commit"], manifest.get("version")

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=clone, capture_output=True, timeout=120)
    tag = git("rev-parse", "--verify", "-q", f"refs/tags/{version}^{{commit}}")
    if tag.returncode != 0:
        raise AuditError(f"--repo-key: the clone {clone} has no tag {version} (git fetch --tags?)")
    if tag.stdout.decode().strip() != commit:
        raise AuditError(f"--repo-key: tag {version} in {clone} is commit {tag.stdout.decode().strip()[:12]}, "
                         f"the manifest names {commit[:12]}")
    # The path comes from the repository too (params.yaml at the tag), never from the manifest alone: a
    # rewritten manifest could otherwise point at any committed public key, a test fixture's say.
    committed = git("show", f"{commit}:params.yaml")
    try:
        import yaml

        declared = ((yaml.safe_load(committed.stdout) or {}).get("publish") or {}).get("public_key") \
            if committed.returncode == 0 else None
    except (yaml.YAMLError, AttributeError):
        declared = None
    if declared != rel:
        raise AuditError(f"--repo-key: the manifest names {rel} but params.yaml at tag {version} sets "
                         f"publish.public_key to {declared!r}")
    shown = git("show", f"{commit}:{rel}")
    if shown.returncode != 0:
        raise AuditError(f"--repo-key: {rel} is not committed at {version} in {clone}")
    return shown.stdout, f"the key committed at {rel} in {clone} at tag {version}"


def check_signature(report, model: Path, manifest: dict[str, Any], anchor: Anchor) -> None:
    from pipeline.release import signing

    want_fp = (manifest.get("signing") or {}).get("public_key_sha256")
    if anchor.identity or anchor.issuer:
        try:
            signing.verify_folder_sigstore(model, anchor.identity or "", anchor.issuer or "", anchor.trust_config)
            report.anchor = f"keyless Sigstore signer {anchor.identity} (issuer {anchor.issuer})"
            report.checked.append(f"signature verifies, signed by {report.anchor}")
        except AuditError as e:
            report.problems.append(str(e))
        return
    if str((manifest.get("signing") or {}).get("method", "")).startswith("sigstore"):
        report.problems.append("this release is signed keyless (Sigstore): verify it with --identity and --issuer")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if anchor.public_key is not None:
            if not anchor.public_key.is_file():
                report.problems.append(f"--public-key {anchor.public_key}: no such file")
                return
            key, what = anchor.public_key, f"the pinned key {anchor.public_key}"
        elif anchor.repo_key:
            try:
                pem, what = repo_key(manifest, anchor.clone)
            except AuditError as e:
                report.problems.append(str(e))
                return
            key = Path(tmp) / "repo-key.pub"
            key.write_bytes(pem)
        else:
            key, what = model / signing.PUBLIC_KEY_FILE, None
        fp = signing.public_key_fingerprint(key.read_bytes()) if key.is_file() else None
        try:
            signing.verify_folder(model, key)
        except AuditError as e:
            report.problems.append(str(e) + (f" (verified against {what}, sha256 {fp})" if what else ""))
            if what and fp != want_fp:
                report.problems.append(f"the signer's key is not {what}: the manifest names key sha256 {want_fp}")
            return
        if fp != want_fp:
            report.problems.append("the public key is not the one the manifest names")
        if what is None:
            report.unanchored = True
            report.checked.append(f"signature valid, signer NOT verified: the key (sha256 {fp}) came inside the "
                                  "release itself; anchor it with --public-key, --repo-key or --identity/--issuer")
        else:
            report.anchor = f"{what} (sha256 {fp})"
            report.checked.append(f"signature verifies with {report.anchor}")
