"""Text normalisation, word n-gram hashing and MinHash near-duplicates.

Everything works on flat numpy arrays of 64-bit word hashes so a batch of thousands of prompts is a
handful of vectorised operations:
- `normalize` (NFKC, casefold, collapsed whitespace) and `words` (runs of word characters of it);
- `window_hashes`: a polynomial hash of every k-word window that stays inside one text;
- `minhash_signatures`: datasketch's "affine32" MinHash scheme (its own permutations, MurmurHash3
  finaliser premix), computed for many documents at once; the signatures equal
  `datasketch.MinHash(hashfunc=int).update_batch(shingles)` (tested);
- `near_duplicates`: LSH banding with datasketch's parameters, vectorised (see its docstring).
Decontamination against evaluation prompts builds on these in `pipeline.data.decontamination`.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from pipeline.core.text import normalize  # noqa: F401 - re-exported: dedup.normalize is the prompt-hash rule

_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the polynomial hash mixes every position
_M32 = np.uint64(0xFFFFFFFF)




def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def words_of_normalized(norm: str) -> list[str]:
    """words() of a text already passed through normalize()."""
    return _WORD.findall(norm)


class WordHasher:
    """Stable 64-bit hashes of words (blake2b), cached: a corpus has far fewer words than tokens."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def ids(self, ws: list[str]) -> list[int]:
        cache = self._cache
        out = []
        for w in ws:
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                if len(cache) < 2_000_000:
                    cache[w] = h
            out.append(h)
        return out


def flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-document word-id lists; return (ids, starts) with starts[i] the offset of doc i."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ids = np.fromiter((h for d in docs for h in d), dtype=np.uint64, count=int(lengths.sum()))
    return ids, starts


def window_hashes(ids: np.ndarray, starts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash of every k-word window that lies inside one document: (hashes, doc index of each)."""
    n = len(ids)
    if n < k or len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        h = np.zeros(n - k + 1, dtype=np.uint64)
        for j in range(k):
            h = h * _BASE + ids[j : n - k + 1 + j]
    doc_of = np.searchsorted(starts, np.arange(n - k + 1), side="right") - 1
    ends = np.append(starts[1:], n)
    valid = np.arange(n - k + 1) + k <= ends[doc_of]
    return h[valid], doc_of[valid]


def sequence_hash(ids: list[int]) -> int:
    """The window hash of a whole word sequence (equal to window_hashes of it with k = len)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0)
        for i in ids:
            h = h * _BASE + np.uint64(i)
    return int(h)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch's affine schemes premix inputs."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingles(docs: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit shingle hashes (k-word windows; a shorter document is one shingle) and each one's doc."""
    ids, starts = flatten(docs)
    h, doc = window_hashes(ids, starts, k)
    short = [i for i, d in enumerate(docs) if len(d) < k]
    if short:
        h = np.concatenate([h, np.array([sequence_hash(docs[i]) for i in short], dtype=np.uint64)])
        doc = np.concatenate([doc, np.array(short, dtype=np.int64)])
    order = np.argsort(doc, kind="stable")
    h32 = ((h ^ (h >> np.uint64(32))) & _M32).astype(np.uint32)
    return h32[order], doc[order]


def permutations(num_perm: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations


def minhash_signatures(docs: list[list[int]], k: int, perms: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """(len(docs), num_perm) uint32 MinHash signatures; every document gets at least one shingle."""
    h32, doc = shingles([d if d else [0] for d in docs], k)
    a, b = perms[0].astype(np.uint32), perms[1].astype(np.uint32)
    sig = np.full((len(docs), len(a)), np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for s in range(0, len(h32), chunk):
            hv = _fmix32(h32[s : s + chunk])
            d = doc[s : s + chunk]
            phv = hv[:, None] * a[None, :] + b[None, :]
            starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            rows = d[starts]  # unique within a chunk: documents are contiguous
            sig[rows] = np.minimum(sig[rows], np.minimum.reduceat(phv, starts, axis=0))
    return sig


def near_duplicates(sigs: np.ndarray, threshold: float, num_perm: int) -> dict[int, tuple[int, float]]:
    """Near-duplicates among documents in order: document i is one when its estimated Jaccard similarity
    with an earlier kept document reaches `threshold`; returns {i: (earlier kept document, Jaccard)}.

    Candidates come from LSH banding with the (bands, rows) that `datasketch.MinHashLSH` picks for this
    threshold and size; the buckets are found for all documents at once with numpy (datasketch's
    per-document insert and query cost ~60 us, too slow for a million rows), and only documents that
    share a bucket with another are then checked one by one. The decisions equal a sequential
    MinHashLSH query-then-insert over the same signatures (tested)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    bands, rows = lsh.b, lsh.r
    n = len(sigs)
    bucket = np.zeros((bands, n), dtype=np.int64)
    shared = np.zeros(n, dtype=bool)
    for band in range(bands):
        keys = np.ascontiguousarray(sigs[:, band * rows:(band + 1) * rows]).view(np.dtype((np.void, 4 * rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        bucket[band] = inverse
        shared |= counts[inverse] > 1
    kept: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    out: dict[int, tuple[int, float]] = {}
    for i in np.flatnonzero(shared).tolist():
        best: tuple[int, float] | None = None
        seen: set[int] = set()
        for band in range(bands):
            for j in kept[band].get(int(bucket[band, i]), ()):
                if j in seen:
                    continue
                seen.add(j)
                jac = float(np.mean(sigs[i] == sigs[j]))
                if jac >= threshold and (best is None or jac > best[1] or (jac == best[1] and j < best[0])):
                    best = (j, jac)
        if best is None:
            for band in range(bands):
                kept[band].setdefault(int(bucket[band, i]), []).append(i)
        else:
            out[i] = best
    return out
