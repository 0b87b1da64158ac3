"""Scanning a release bundle for secrets before anything is published.

Three layers, so one miss is not a leak: detect-secrets' own scanner on small text files (its
credential plugins, not the entropy ones, which flag every sha256 in a manifest); the same plugins'
patterns plus explicit ones (Hugging Face tokens, private-key blocks, ...) over every file's bytes,
binary included; and the literal values of token-bearing environment variables (HF_TOKEN, ...). Parquet
text is compressed on disk, so its string cells are read and scanned too. A finding names the file,
line and kind, never the secret. A line marked `# pragma: allowlist secret` (detect-secrets' marker) is
skipped by the pattern scans, so a test fixture can hold a fake key; a live token's value never is.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# detect-secrets plugins that look for credentials by their shape (no entropy or keyword heuristics).
PLUGINS = (
    "AWSKeyDetector", "ArtifactoryDetector", "AzureStorageKeyDetector", "BasicAuthDetector",
    "DiscordBotTokenDetector", "GitHubTokenDetector", "GitLabTokenDetector", "JwtTokenDetector",
    "MailchimpDetector", "NpmDetector", "OpenAIDetector", "PrivateKeyDetector", "PypiTokenDetector",
    "SendGridDetector", "SlackDetector", "SquareOAuthDetector", "StripeDetector", "TelegramBotTokenDetector",
    "TwilioKeyDetector",
)
EXPLICIT = {
    "Hugging Face token": rb"\bhf_[A-Za-z0-9]{30,}",
    "Hugging Face OAuth token": rb"\bhf_oauth_[A-Za-z0-9_]{20,}",
    "private key block": rb"-----BEGIN (?:[A-Z ]+ )?PRIVATE KEY-----",
    "OpenAI key": rb"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}",
    "Anthropic key": rb"\bsk-ant-[A-Za-z0-9_-]{32,}",
    "AWS access key id": rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": rb"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "Google API key": rb"\bAIza[0-9A-Za-z_-]{35}",
}
# Environment variables whose values must never appear in a release, whatever they look like.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "OPENRELEASE_SIGNING_KEY_PASSWORD")
PATTERN_MAX_BYTES = 16 << 20     # regex scans run at ~60 MB/s per pattern here: fine for text, not for weights
DETECT_SECRETS_MAX_BYTES = 512 * 1024   # detect-secrets scans line by line: ~20 s for a 3.5 MB tokenizer.json
ALLOWLIST = b"pragma: allowlist secret"
TEXT_SUFFIXES = {".md", ".json", ".jsonl", ".txt", ".yaml", ".yml", ".jinja", ".csv", ".html", ".py", ".toml", ".cfg"}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int | None
    kind: str

    def __str__(self) -> str:
        return f"{self.path}{f':{self.line}' if self.line else ''}: {self.kind}"


def _plugin_patterns() -> list[tuple[str, re.Pattern]]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    out = []
    for cls in get_mapping_from_secret_type_to_class().values():
        if cls.__name__ in PLUGINS:
            for rx in getattr(cls, "denylist", ()) or ():
                out.append((cls.secret_type, re.compile(rx.pattern.encode(), rx.flags & ~re.UNICODE)))
    return out


def _env_values() -> list[tuple[str, bytes]]:
    # Short values would match by chance; real tokens are long.
    return [(f"value of ${n}", v.encode()) for n in SECRET_ENV if len(v := os.environ.get(n, "")) >= 8]


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _allowlisted(data: bytes, offset: int) -> bool:
    """detect-secrets' inline marker, honoured for pattern matches (never for a live token's value)."""
    start = data.rfind(b"\n", 0, offset) + 1
    end = data.find(b"\n", offset)
    return ALLOWLIST in data[start : end if end >= 0 else len(data)]


def scan_bytes(data: bytes, name: str, patterns: list[tuple[str, re.Pattern]]) -> list[Finding]:
    found = []
    for kind, rx in patterns:
        m = next((m for m in rx.finditer(data) if not _allowlisted(data, m.start())), None)
        if m:
            found.append(Finding(name, _line_of(data, m.start()), kind))
    for kind, value in _env_values():
        i = data.find(value)
        if i >= 0:
            found.append(Finding(name, _line_of(data, i), kind))
    return found


def _parquet_text(path: Path) -> bytes:
    """Every string cell (nested lists and structs included) as lines of UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: list[str] = []

    def walk(arr):
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out.extend(s for s in arr.to_pylist() if s)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(arr.flatten())
        elif pa.types.is_struct(t):
            for i in range(t.num_fields):
                walk(arr.field(i))

    for batch in pq.ParquetFile(path).iter_batches():
        for col in batch.columns:
            walk(col)
    return "\n".join(out).encode("utf-8")


def _detect_secrets(path: Path, rel: str) -> list[Finding]:
    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import transient_settings

    with transient_settings({"plugins_used": [{"name": p} for p in PLUGINS]}):
        return [Finding(rel, s.line_number, s.type) for s in scan_file(str(path))]


def _safetensors_header(data: bytes) -> bytes:
    """The JSON header (names, shapes, free-form __metadata__): the only text in a safetensors file."""
    if len(data) < 8:
        return data
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + min(n, len(data))]


def _archive_members(path: Path) -> list[tuple[str, bytes]]:
    import tarfile

    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and m.size <= PATTERN_MAX_BYTES:
                f = tar.extractfile(m)
                if f is not None:
                    out.append((m.name, f.read()))
    return out


def scan_folder(folder: Path) -> tuple[list[Finding], list[str]]:
    """Every secret-looking thing in any file under `folder`, and notes on files scanned only in part.

    Large binaries get the literal token search over all their bytes (fast) and the patterns over the
    parts that can hold text: a safetensors header, Parquet string cells, the files inside a tar archive.
    """
    patterns = [*_plugin_patterns(), *((k, re.compile(v)) for k, v in EXPLICIT.items())]
    findings: list[Finding] = []
    partial: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        name = path.name.lower()
        if name.endswith(".safetensors"):
            findings += scan_bytes(data, rel, [])  # literal values only: the float data is not text
            findings += scan_bytes(_safetensors_header(data), f"{rel} (header)", patterns)
        elif name.endswith(".parquet"):
            findings += scan_bytes(data, rel, [])
            findings += scan_bytes(_parquet_text(path), f"{rel} (text cells)", patterns)
        elif name.endswith((".tar.gz", ".tgz", ".tar")):
            findings += scan_bytes(data, rel, [])
            for member, content in _archive_members(path):
                findings += scan_bytes(content, f"{rel}!{member}", patterns)
        elif len(data) <= PATTERN_MAX_BYTES:
            findings += scan_bytes(data, rel, patterns)
            if path.suffix in TEXT_SUFFIXES and len(data) <= DETECT_SECRETS_MAX_BYTES:
                findings += _detect_secrets(path, rel)
        else:
            findings += scan_bytes(data, rel, [])
            partial.append(f"{rel}: {len(data) >> 20} MiB unknown binary, searched for token values only")
    # Several layers often report one secret; keep one line per place, naming every kind seen.
    kinds: dict[tuple[str, int | None], set[str]] = {}
    for f in findings:
        kinds.setdefault((f.path, f.line), set()).add(f.kind)
    merged = [Finding(p, ln, " / ".join(sorted(k))) for (p, ln), k in sorted(kinds.items(), key=lambda x: (x[0][0], x[0][1] or 0))]
    return merged, partial
