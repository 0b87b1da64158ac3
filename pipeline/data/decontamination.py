"""Decontamination: evaluation prompts indexed for exact matches and word n-gram overlap.

Texts are compared as normalised word sequences (`pipeline.data.dedup.words`: NFKC, casefold, runs of word
characters, so case, punctuation and spacing do not hide a copy). A training prompt is contaminated
when any of its user turns equals an evaluation text, or contains one of its n-grams (13 words by
default, as in the GPT-3 and Llama decontamination studies). An evaluation text shorter than n words
but at least `min_words` long counts as one n-gram of its own length; shorter ones (a two-word
follow-up) match only exactly, so they cannot remove unrelated prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError, SourceError
from pipeline.core.lineage import sha256_file
from pipeline.core.params import EvalPromptSet
from pipeline.data.dedup import WordHasher, flatten, sequence_hash, window_hashes, words
from pipeline.data.formats.common import excerpt, iter_records


@dataclass
class Match:
    eval_set: str
    item: str
    kind: str  # "exact" or "<k>-gram"
    text: str  # the matching eval text (shortened)


class EvalIndex:
    """Evaluation texts indexed for exact matches and word n-gram overlap.

    An eval text with at least `n` words contributes all its n-grams; one with fewer words but at least
    `min_words` contributes itself as a single n-gram of its own length; shorter texts match exactly only.
    """

    def __init__(self, n: int, min_words: int, hasher: WordHasher | None = None) -> None:
        self.n, self.min_words = n, min_words
        self.hasher = hasher or WordHasher()
        self.exact: dict[str, Match] = {}
        self._grams: dict[int, dict[int, Match]] = {}
        self._keys: dict[int, np.ndarray] = {}
        self.sizes: dict[str, int] = {}

    def add(self, eval_set: str, item: str, text: str) -> None:
        ws = words(text)
        if not ws:
            return
        self._keys.clear()
        self.sizes[eval_set] = self.sizes.get(eval_set, 0) + 1
        m = Match(eval_set, item, "exact", text[:120])
        self.exact.setdefault(" ".join(ws), m)
        ids = self.hasher.ids(ws)
        if len(ws) >= self.n:
            hs, _ = window_hashes(np.array(ids, dtype=np.uint64), np.zeros(1, dtype=np.int64), self.n)
            grams = self._grams.setdefault(self.n, {})
            for h in hs.tolist():
                grams.setdefault(h, Match(eval_set, item, f"{self.n}-gram", text[:120]))
        elif len(ws) >= self.min_words:
            self._grams.setdefault(len(ws), {}).setdefault(sequence_hash(ids),
                                                           Match(eval_set, item, f"{len(ws)}-gram", text[:120]))

    def match(self, docs_words: list[list[str]], doc_ids: list[list[int]]) -> list[Match | None]:
        """The first match of each document (its word list and word ids), or None."""
        out: list[Match | None] = [self.exact.get(" ".join(ws)) for ws in docs_words]
        if not self._grams:
            return out
        ids, starts = flatten(doc_ids)
        for k in sorted(self._grams):
            table = self._grams[k]
            if k not in self._keys:
                self._keys[k] = np.sort(np.fromiter(table.keys(), dtype=np.uint64, count=len(table)))
            keys = self._keys[k]
            h, doc = window_hashes(ids, starts, k)
            hit = keys[np.minimum(np.searchsorted(keys, h), len(keys) - 1)] == h
            for hv, d in zip(h[hit].tolist(), doc[hit].tolist(), strict=True):
                if out[d] is None:
                    out[d] = table[hv]
        return out


def eval_texts(record: dict, field: str, path: str, where: int) -> list[str]:
    """The user texts of one evaluation record: a string, a list of turns, or a list of messages."""
    value = record.get(field)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict) and isinstance(v.get("content"), str) and v.get("role", "user") == "user":
                out.append(v["content"])
        if out or not value:
            return out
    raise DataError(path, where, "eval prompt field", f"{field!r} must be a string, a list of turns or of "
                    f"{{role, content}} messages; got {excerpt(value)}")


def load_index(sets: list[EvalPromptSet], n: int, min_words: int, root: Path) -> tuple[EvalIndex, dict]:
    """An EvalIndex over every set's texts (each turn of a multi-turn item is its own text), and per set
    the report skeleton: path, field, sha256, number of prompts, removed rows."""
    index = EvalIndex(n, min_words)
    info: dict[str, Any] = {}
    for s in sets:
        path = Path(s.path) if Path(s.path).is_absolute() else root / s.path
        if not path.is_file():
            raise SourceError(f"decontamination set {s.name}: {s.path} does not exist")
        digest = sha256_file(path)
        if s.sha256 and digest != s.sha256:
            raise SourceError(f"decontamination set {s.name}: {s.path} has sha256 {digest}, params pin {s.sha256}")
        n = 0
        for where, rec in iter_records(str(path)):
            item = next((str(rec[k]) for k in ("id", "question_id", "uid") if k in rec), str(where))
            for t, text in enumerate(eval_texts(rec, s.field, str(path), where)):
                index.add(s.name, f"{item}" if t == 0 else f"{item}#turn{t + 1}", text)
            n += 1
        info[s.name] = {"path": s.path, "field": s.field, "sha256": digest, "prompts": n, "removed": 0, "rows": []}
    return index, info


def role_overlaps(roles: dict[str, str], n: int, min_words: int, root: Path, field: str = "prompt") -> list[str]:
    """Overlaps between prompt files that must be disjoint (train, dev, test): for each file after the
    first, every prompt that equals or shares an n-gram with a prompt of an earlier file, as
    `file:line (id) overlaps <role> <id> (<kind>)`. Empty when the roles are disjoint."""
    problems: list[str] = []
    names = list(roles)
    for i, later in enumerate(names[1:], start=1):
        sets = [EvalPromptSet(name=r, path=roles[r], field=field) for r in names[:i]]
        index, _ = load_index(sets, n, min_words, root)
        path = Path(roles[later]) if Path(roles[later]).is_absolute() else root / roles[later]
        for where, rec in iter_records(str(path)):
            texts = eval_texts(rec, field, str(path), where)
            ws = [words(t) for t in texts]
            for m in index.match(ws, [index.hasher.ids(w) for w in ws]):
                if m is not None:
                    problems.append(f"{roles[later]}:{where} ({rec.get('id', rec.get('key', '?'))}) overlaps "
                                    f"{m.eval_set} {m.item} ({m.kind})")
                    break
    return problems
