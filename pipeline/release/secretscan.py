"""Scanning a release bundle for secrets before anything is published.

Three layers, so one miss is not a leak: detect-secrets' own scanner on small text files (its
credential plugins, not the entropy ones, which flag every sha256 in a manifest); the same plugins'
patterns plus explicit ones (Hugging Face tokens, private-key blocks, ...) over every file's bytes,
binary included; and the literal values of token-bearing environment variables (HF_TOKEN, ...). Parquet
text is compressed on disk, so its string cells are read and scanned too. A finding names the file,
line and kind, never the secret. A line marked `# pragma: allowlist secret` (detect-secrets' marker) is
skipped by the pattern scans only inside the source archive, so a test fixture can hold a fake key;
in dataset text, cards and reports anyone could write the marker, so it is ignored there, and a live
token's value is never skipped. Large files are streamed, never read whole.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


CHUNK_BYTES = 8 << 20   # large files are streamed in pieces this size (a token value spanning two is still found)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _allowlisted(data: bytes, offset: int) -> bool:
    """detect-secrets' inline marker on the line of `offset`."""
    start = data.rfind(b"\n", 0, offset) + 1
    end = data.find(b"\n", offset)
    return ALLOWLIST in data[start : end if end >= 0 else len(data)]


def scan_bytes(data: bytes, name: str, patterns: list[tuple[str, re.Pattern]], honour_allowlist: bool = False) -> list[Finding]:
    """Pattern and token-value findings in `data`. The allowlist marker is honoured only where asked (source
    code in the archive, where test fixtures live): in dataset text or a card anyone could write it."""
    found = []
    for kind, rx in patterns:
        m = next((m for m in rx.finditer(data) if not (honour_allowlist and _allowlisted(data, m.start()))), None)
        if m:
            found.append(Finding(name, _line_of(data, m.start()), kind))
    for kind, value in _env_values():
        i = data.find(value)
        if i >= 0:
            found.append(Finding(name, _line_of(data, i), kind))
    return found


def stream_values(f: BinaryIO, name: str, skip: int = 0) -> list[Finding]:
    """Token values in a file object read piece by piece (never whole); line numbers count from `skip`."""
    values = _env_values()
    if not values:
        return []
    keep = max(len(v) for _, v in values) - 1
    found: dict[str, Finding] = {}
    tail, lines_before = b"", 1
    f.seek(skip)
    while chunk := f.read(CHUNK_BYTES):
        window = tail + chunk
        for kind, value in values:
            i = window.find(value)
            if i >= 0 and kind not in found:
                found[kind] = Finding(name, lines_before + window.count(b"\n", 0, i), kind)
        cut = max(len(window) - keep, 0)
        lines_before += window.count(b"\n", 0, cut)
        tail = window[cut:]
    return list(found.values())


def _parquet_findings(path: Path, rel: str, patterns) -> list[Finding]:
    """Every string cell (nested lists and structs included), one batch at a time; line = cell number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found, cells = [], 0

    def walk(arr, out):
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out.extend(s for s in arr.to_pylist() if s)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(arr.flatten(), out)
        elif pa.types.is_struct(t):
            for i in range(t.num_fields):
                walk(arr.field(i), out)

    seen = set()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        texts: list[str] = []
        for col in batch.columns:
            walk(col, texts)
        for fd in scan_bytes("\n".join(texts).encode("utf-8"), f"{rel} (text cells)", patterns):
            if fd.kind not in seen:
                seen.add(fd.kind)
                found.append(Finding(fd.path, cells + (fd.line or 1), fd.kind))
        cells += len(texts)
    return found


def _detect_secrets(path: Path, rel: str) -> list[Finding]:
    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import transient_settings

    with transient_settings({"plugins_used": [{"name": p} for p in PLUGINS]}):
        return [Finding(rel, s.line_number, s.type) for s in scan_file(str(path))]


def _safetensors_header(f: BinaryIO) -> bytes:
    """The JSON header (names, shapes, free-form __metadata__): the only text in a safetensors file."""
    head = f.read(8)
    if len(head) < 8:
        return head
    n = int.from_bytes(head, "little")
    return f.read(min(n, PATTERN_MAX_BYTES))


def _archive_findings(path: Path, rel: str, patterns, partial: list[str]) -> list[Finding]:
    import tarfile

    found = []
    with tarfile.open(path) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isfile() else None
            if f is None:
                continue
            name = f"{rel}!{m.name}"
            if m.size <= PATTERN_MAX_BYTES:
                found += scan_bytes(f.read(), name, patterns, honour_allowlist=True)
            else:
                found += stream_values(f, name)
                partial.append(f"{name}: {m.size >> 20} MiB archive member, searched for token values only")
    return found


def scan_folder(folder: Path) -> tuple[list[Finding], list[str]]:
    """Every secret-looking thing in any file under `folder`, and every file it could scan only in part.

    Files larger than PATTERN_MAX_BYTES are never read whole: they are streamed for the literal token
    values, and the patterns run over the parts that can hold text (a safetensors header, Parquet string
    cells batch by batch, the members of a tar archive). A file whose content could not all be pattern
    scanned is listed in `partial` with the reason.
    """
    patterns = [*_plugin_patterns(), *((k, re.compile(v)) for k, v in EXPLICIT.items())]
    findings: list[Finding] = []
    partial: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        name, size = path.name.lower(), path.stat().st_size
        with open(path, "rb") as f:
            if name.endswith(".safetensors"):
                findings += scan_bytes(_safetensors_header(f), f"{rel} (header)", patterns)
                findings += stream_values(f, rel)  # the tensors: float data, no text; token values still searched
            elif name.endswith(".parquet"):
                findings += stream_values(f, rel)
                findings += _parquet_findings(path, rel, patterns)
            elif name.endswith((".tar.gz", ".tgz", ".tar")):
                findings += stream_values(f, rel)
                findings += _archive_findings(path, rel, patterns, partial)
            elif size <= PATTERN_MAX_BYTES:
                findings += scan_bytes(f.read(), rel, patterns)
                if path.suffix in TEXT_SUFFIXES and size > DETECT_SECRETS_MAX_BYTES:
                    partial.append(f"{rel}: {size >> 10} KiB, too large for detect-secrets' line scanner; "
                                   "patterns and token values scanned in full")
                elif path.suffix in TEXT_SUFFIXES:
                    findings += _detect_secrets(path, rel)
            else:
                findings += stream_values(f, rel)
                partial.append(f"{rel}: {size >> 20} MiB unknown binary, searched for token values only")
    # Several layers often report one secret; keep one line per place, naming every kind seen.
    kinds: dict[tuple[str, int | None], set[str]] = {}
    for f in findings:
        kinds.setdefault((f.path, f.line), set()).add(f.kind)
    merged = [Finding(p, ln, " / ".join(sorted(k))) for (p, ln), k in sorted(kinds.items(), key=lambda x: (x[0][0], x[0][1] or 0))]
    return merged, partial
