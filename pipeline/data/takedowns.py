"""Takedowns: raw records a source asked to remove, named by hash, dropped where ingest reads them.

The takedown file (`paths.takedowns`, default `data/takedowns.yaml`, git-tracked and a DVC dependency
of every `ingest_source@<i>` stage and of `ingest`) never holds the removed text, only its hash:

```yaml
takedowns:
  - sha256: 3f5a...e9      # record_sha256 of the raw record (64 lowercase hex)
    reason: personal data  # required, non-empty
    date: 2026-12-01       # required, ISO date the takedown was accepted
    reference: ticket-42   # optional: a ticket, an email id, a URL
```

**What is hashed.** `record_sha256(record)` is the sha256 of the raw source record (one JSON line,
one element of a JSON array, one Parquet or Hub row, as the reader got it, before any normalisation)
serialised as canonical JSON: `json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=True)` encoded as UTF-8, with values JSON cannot hold written as
bytes -> base64 text, dates and times -> ISO 8601 text, anything else -> `str()`. So the hash is the
same whether a record sits in JSONL, a JSON array or Parquet, and independent of key order and
whitespace in the file. For JSONL: `python -c 'import json,sys,hashlib; r=json.loads(sys.stdin.readline());
print(hashlib.sha256(json.dumps(r,sort_keys=True,separators=(",",":"),ensure_ascii=False).encode()).hexdigest())'`.
`openrelease trace SOURCE:LINE` prints it too.

Every normalised row carries `record_sha256`, the list of the hashes of the raw records it was made
from (one record, or every response row of a `rated` prompt group), and build copies it into each
pair's provenance, so a release alone shows which records each pair derives from.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
KEYS = ("sha256", "reason", "date", "reference")

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    return str(value)


def canonical_json(record: Any) -> bytes:
    """The bytes `record_sha256` hashes (module docstring)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True,
                      default=_jsonable).encode("utf-8")


def record_sha256(record: Any) -> str:
    return hashlib.sha256(canonical_json(record)).hexdigest()


@dataclass(frozen=True)
class Takedown:
    sha256: str
    reason: str
    date: str          # ISO 8601 date
    reference: str | None = None
    line: int | None = None   # where the entry starts in the file, for messages

    def public(self) -> dict[str, Any]:
        """What a release may say about it: the hash and the why, never content."""
        d = asdict(self)
        d.pop("line")
        return d


def _entry_lines(text: str) -> list[int]:
    """The 1-based line of each item of the `takedowns` list (the YAML node marks), for messages."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if getattr(key, "value", None) == "takedowns" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def load_takedowns(path: Path | str, shown: str | None = None) -> list[Takedown]:
    """The entries of a takedown file; a missing file is no takedowns. Any malformed entry is one DataError
    naming file:line, the entry number, the key, the rule and the value."""
    import yaml

    path = Path(path)
    shown = shown or str(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(shown, mark.line + 1 if mark else None, "valid YAML",
                        str(getattr(e, "problem", None) or e).splitlines()[0]) from None
    if raw is None:
        return []
    if not isinstance(raw, dict) or set(raw) != {"takedowns"}:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(shown, 1, "a mapping with one key `takedowns` (a list of entries)", f"got {got}")
    entries = raw["takedowns"] or []
    if not isinstance(entries, list):
        raise DataError(shown, 1, "`takedowns` is a list of entries", f"got {type(entries).__name__}")
    lines = _entry_lines(text)
    out, seen = [], {}
    for i, e in enumerate(entries):
        line = lines[i] if i < len(lines) else None

        def bad(key: str, rule: str, value: Any, i: int = i, line: int | None = line) -> DataError:
            return DataError(shown, line, f"takedowns[{i}].{key}", f"{rule}, got {value!r:.80}")

        if not isinstance(e, dict):
            raise DataError(shown, line, f"takedowns[{i}]", f"an entry is a mapping of {', '.join(KEYS)}, "
                            f"got {type(e).__name__}")
        unknown = sorted(set(e) - set(KEYS))
        if unknown:  # e.g. `text:` would put the removed content back in git
            raise bad(unknown[0], f"unknown key (allowed: {', '.join(KEYS)}; the file never holds the removed text)",
                      e[unknown[0]])
        sha = e.get("sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise bad("sha256", "the raw record's sha256 as 64 lowercase hex digits", sha)
        reason = e.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise bad("reason", "a non-empty reason is required", reason)
        date = e.get("date")
        if isinstance(date, dt.datetime):
            date = date.date()
        if isinstance(date, str):
            try:
                date = dt.date.fromisoformat(date)
            except ValueError:
                pass
        if not isinstance(date, dt.date):
            raise bad("date", "an ISO date (YYYY-MM-DD) is required", e.get("date"))
        ref = e.get("reference")
        if ref is not None and (not isinstance(ref, str) or not ref.strip()):
            raise bad("reference", "optional; when given, a non-empty string", ref)
        if sha in seen:
            raise bad("sha256", f"listed twice (first at entry {seen[sha]})", sha)
        seen[sha] = i
        out.append(Takedown(sha256=sha, reason=reason.strip(), date=date.isoformat(),
                            reference=ref.strip() if ref else None, line=line))
    return out


def file_digest(takedowns: list[Takedown]) -> str:
    """A digest of the entries (not of comments or layout): per-source outputs record it, and the merge
    refuses a source ingested under another list."""
    return hashlib.sha256(json.dumps([t.public() for t in takedowns], sort_keys=True).encode()).hexdigest()


class TakedownFilter:
    """Drops records whose record_sha256 is taken down, counting each hash's matches."""

    def __init__(self, takedowns: list[Takedown]):
        self.by_sha = {t.sha256: t for t in takedowns}
        self.matched: Counter = Counter()

    def __bool__(self) -> bool:
        return bool(self.by_sha)

    def drop(self, record: Any) -> bool:
        sha = record_sha256(record)
        if sha in self.by_sha:
            self.matched[sha] += 1
            return True
        return False

    @property
    def excluded(self) -> int:
        return sum(self.matched.values())


def warn_unmatched(takedowns: list[Takedown], matched: Counter, shown: str) -> list[str]:
    """Hashes that matched no record in any source: a warning (a typo, or a record already gone from the
    source), not an error, since the file must be able to outlive the data it protects against."""
    missing = [t for t in takedowns if not matched.get(t.sha256)]
    if missing:
        where = ", ".join(f"line {t.line} {t.sha256[:12]}..." if t.line else t.sha256[:12] + "..." for t in missing[:5])
        log.warning("%s: %d takedown(s) match no record in any source: %s%s", shown, len(missing), where,
                    " ..." if len(missing) > 5 else "")
    return [t.sha256 for t in missing]
