"""A content-addressed store for expensive evaluation results (generations, log-probs, judgments).

Each entry is one small JSON file named by the sha256 of its key: a JSON object naming everything
the value depends on (model sha256, prompt hash, decoding params, judge id, template hash, the code's
sha256, library versions, device and dtype; see `pipeline.eval.measures.env_key`). The entry stores its
full key, and a hit requires the stored key to equal the requested one, not just the file name.
Nothing is ever invalidated in place: when any part of the key changes, the new key simply misses
and the value is recomputed; stale entries are harmless and can be deleted at any time.

One file per entry keeps writes atomic (each is an `atomic_write_json`) and lets two runs share a
cache folder without locking. The folder is a DVC `persist: true` output, so `dvc repro` keeps it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_json
from pipeline.core.lineage import sha256_json

log = logging.getLogger(__name__)


class EvalCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()

    def _file(self, kind: str, key: dict[str, Any]) -> Path:
        digest = sha256_json({"kind": kind, **key})
        return self.root / kind / digest[:2] / f"{digest}.json"

    def get(self, kind: str, key: dict[str, Any]) -> Any | None:
        """The stored value, or None on a miss (a corrupt entry counts as a miss and is rewritten)."""
        path = self._file(kind, key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            stored, value = entry["key"], entry["value"]
        except FileNotFoundError:
            self.misses[kind] += 1
            return None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("cache entry %s is unreadable; recomputing it", path)
            self.misses[kind] += 1
            return None
        if stored != json.loads(json.dumps({"kind": kind, **key})):  # compared as stored (JSON round trip)
            log.warning("cache entry %s holds another key; recomputing it", path)
            self.misses[kind] += 1
            return None
        self.hits[kind] += 1
        return value

    def put(self, kind: str, key: dict[str, Any], value: Any) -> None:
        atomic_write_json(self._file(kind, key), {"key": {"kind": kind, **key}, "value": value})

    def stats(self) -> dict[str, int]:
        """Flat hit/miss counts per kind, e.g. `cache_generation_hits` (for metrics and the log)."""
        out: dict[str, int] = {}
        for kind in sorted(set(self.hits) | set(self.misses)):
            out[f"cache_{kind}_hits"] = self.hits[kind]
            out[f"cache_{kind}_misses"] = self.misses[kind]
        return out
