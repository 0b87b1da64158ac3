"""Signing and verifying the model repo folder with OpenSSF model-signing (key-based, offline).

The signature covers every file of the model repo folder (weights, card, manifest, public key, ...);
the manifest in turn lists the sha256 of every dataset repo file, so one signature covers the release.
The private key comes from OPENRELEASE_SIGNING_KEY (a PEM path; OPENRELEASE_SIGNING_KEY_PASSWORD if it
is encrypted), else `publish.signing_key`, else a P-256 key pair generated once under `paths.keys`
(git-ignored) for local use. Only the public key ever goes into a release.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import AuditError, SourceError
from pipeline.core.io import atomic_write_bytes

log = logging.getLogger(__name__)

ENV_KEY = "OPENRELEASE_SIGNING_KEY"
ENV_PASSWORD = "OPENRELEASE_SIGNING_KEY_PASSWORD"
SIGNATURE_FILE = "model.sig"
PUBLIC_KEY_FILE = "signing-key.pub"
LOCAL_KEY_NAME = "signing-key.pem"


@dataclass
class SigningKey:
    private_path: Path
    public_pem: bytes
    origin: str  # env | params | generated

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.public_pem)


def public_key_fingerprint(public_pem: bytes) -> str:
    """sha256 of the PEM public key, as model-signing records it in the bundle's key hint."""
    return hashlib.sha256(public_pem).hexdigest()


def _public_pem(private_path: Path, password: str | None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(),
                                                 password.encode() if password else None)
    except (ValueError, TypeError) as e:
        raise SourceError(f"signing key {private_path}: cannot load it as a PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SourceError(f"signing key {private_path}: model-signing needs an elliptic-curve key "
                          f"(P-256/P-384/P-521), got {type(key).__name__}")
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(private_path: Path) -> None:
    """Write a new P-256 private key (mode 0600) and its public key beside it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(private_path, pem)
    atomic_write_bytes(private_path.with_suffix(".pub"), key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no other user can read it at any moment, even mid-write.

    The temporary file is created by os.open with mode 0600 (O_EXCL: never an existing file an
    attacker prepared), filled, fsynced and renamed over `path`; a crash leaves no readable copy.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask allowed, never more than 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resolve_key(params_key: str | None, keys_dir: Path) -> SigningKey:
    """The signing key to use: environment, then params, then a generated local key."""
    password = os.environ.get(ENV_PASSWORD) or None
    if env := os.environ.get(ENV_KEY):
        path, origin = Path(env), "env"
    elif params_key:
        path, origin = Path(params_key), "params"
    else:
        path, origin = keys_dir / LOCAL_KEY_NAME, "generated"
        if not path.exists():
            log.warning("no signing key configured (%s or publish.signing_key): generating a local key pair at %s; "
                        "use a key kept outside the repository for real releases", ENV_KEY, path)
            generate_key(path)
    if not path.is_file():
        raise SourceError(f"signing key {path} (from {origin}) does not exist")
    return SigningKey(private_path=path, public_pem=_public_pem(path, password), origin=origin)


def _hashing_config():
    from model_signing import hashing

    # The signature file cannot sign itself; everything else in the folder is covered.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=True)


def sign_folder(folder: Path, key: SigningKey) -> Path:
    """Sign every file under `folder` into `folder/model.sig` (a Sigstore bundle, DSSE envelope)."""
    from model_signing import signing

    sig = folder / SIGNATURE_FILE
    password = os.environ.get(ENV_PASSWORD) or None
    (signing.Config().set_hashing_config(_hashing_config())
     .use_elliptic_key_signer(private_key=key.private_path, password=password)
     .sign(folder, sig))
    return sig


def verify_folder(folder: Path, public_key: Path) -> None:
    """Raise AuditError naming every differing file when `folder` does not match its signature."""
    from model_signing import verifying

    sig = folder / SIGNATURE_FILE
    if not sig.is_file():
        raise AuditError(f"{sig}: no signature")
    if not public_key.is_file():
        raise AuditError(f"{public_key}: no public key to verify with")
    from cryptography.exceptions import InvalidSignature

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(folder, sig)
    except InvalidSignature:
        raise AuditError("signature does not verify: the signed statement was altered or made by another key") from None
    except (ValueError, KeyError) as e:
        raise AuditError(f"signature does not verify: {_readable(str(e))}") from None


def _readable(message: str) -> str:
    """model-signing reports digests as Python bytes reprs inside a list repr; name the files instead."""
    if not message.startswith("Signature mismatch"):
        return message
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)", message)
    extra = re.findall(r"Extra files found in model [^:]*: ([^\"\]]+?)\\?['\"]", message)
    missing = re.findall(r"Missing files in model [^:]*: ([^\"\]]+?)\\?['\"]", message)
    parts = [f"changed since signing: {', '.join(changed)}" if changed else "",
             f"not signed: {', '.join(extra)}" if extra else "",
             f"signed but missing: {', '.join(missing)}" if missing else ""]
    return "; ".join(p for p in parts if p) or message


# -- keyless (Sigstore) ---------------------------------------------------------------------------
# In CI the release can be signed without any key: the runner's OIDC identity token (GitHub Actions:
# `permissions: id-token: write`) gets a short-lived certificate from Sigstore's Fulcio naming the
# workflow, and the signature is logged in Rekor. The audit then checks the certificate's identity and
# issuer against what the user expects. Both directions need Sigstore's servers (the verifier needs its
# trust root, fetched by TUF) unless a trust config file is given.
ENV_METHOD = "OPENRELEASE_SIGNING"   # `sigstore`: keyless signing (CI); unset or `key`: a PEM key
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


def signing_method() -> str:
    method = (os.environ.get(ENV_METHOD) or "key").strip().lower()
    if method not in ("key", "sigstore"):
        raise SourceError(f"${ENV_METHOD}={method!r}: expected `key` or `sigstore`")
    return method


def sign_folder_sigstore(folder: Path) -> Path:
    """Keyless signing with the ambient OIDC identity (GitHub Actions, GitLab CI, Buildkite, GCP)."""
    from model_signing import signing

    sig = folder / SIGNATURE_FILE
    try:
        (signing.Config().set_hashing_config(_hashing_config())
         .use_sigstore_signer(use_ambient_credentials=True).sign(folder, sig))
    except Exception as e:  # sigstore raises its own and network errors; report them in one line
        raise SourceError(f"Sigstore keyless signing failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "it needs network access to Sigstore and an OIDC identity (in GitHub Actions: "
                          "`permissions: id-token: write`)") from None
    return sig


def sigstore_verifier(identity: str, issuer: str, trust_config: Path | None = None):
    """A model-signing verification config that accepts only a certificate for `identity` from `issuer`."""
    from model_signing import verifying

    if not identity or not issuer:
        raise AuditError("keyless verification needs both --identity and --issuer")
    if trust_config is not None and not trust_config.is_file():
        raise AuditError(f"{trust_config}: no Sigstore trust config file")
    try:
        return verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=issuer, trust_config=trust_config)
    except Exception as e:  # TUFError offline, ValueError for a bad trust config
        raise AuditError(f"Sigstore trust root unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "keyless verification needs network access to Sigstore's TUF repository, or "
                         "--sigstore-trust-config FILE for an offline trust root") from None


def verify_folder_sigstore(folder: Path, identity: str, issuer: str, trust_config: Path | None = None) -> None:
    sig = folder / SIGNATURE_FILE
    if not sig.is_file():
        raise AuditError(f"{sig}: no signature")
    config = sigstore_verifier(identity, issuer, trust_config)
    try:
        config.verify(folder, sig)
    except Exception as e:  # sigstore's VerificationError, ValueError for mismatched files, bundle errors
        raise AuditError(f"keyless signature does not verify for identity {identity} from {issuer}: "
                         f"{_readable(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from None
