"""build's filters before binarization: prompt keys, decontamination matches, source weights, exact and
near duplicates. Every filtered prompt group gets the filter's name and the row it came from."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np

from pipeline.core.params import BuildParams, DataParams
from pipeline.data import dedup
from pipeline.data.decontamination import EvalIndex


def prompt_key(prompt: list[dict], norms: list[str] | None = None) -> str:
    """sha256 of the normalised prompt (roles + normalised text): the dedup and split key."""
    norms = norms if norms is not None else [dedup.normalize(m["content"]) for m in prompt]
    text = "\x1e".join(f"{m['role']}\x1f{n}" for m, n in zip(prompt, norms, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


def unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from a hash of the parts: seeded, order-free randomness."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16) / 2**64


def prepare(batch, index: EvalIndex, hasher: dedup.WordHasher, p: BuildParams, perms):
    """Per row: the prompt hash, the first eval-set match (JSON, "" if none) and the MinHash signature."""
    import pyarrow as pa

    prompts = batch.column("prompt").to_pylist()
    user_words, user_ids, user_row, all_ids, keys = [], [], [], [], []
    for r, prompt in enumerate(prompts):
        row_ids: list[int] = []
        norms = [dedup.normalize(m["content"]) for m in prompt]
        keys.append(prompt_key(prompt, norms))
        for m, norm in zip(prompt, norms, strict=True):
            ws = dedup.words_of_normalized(norm)
            ids = hasher.ids(ws)
            row_ids += ids
            if m["role"] == "user":
                user_words.append(ws)
                user_ids.append(ids)
                user_row.append(r)
        all_ids.append(row_ids)
    contamination = [""] * len(prompts)
    for r, match in zip(user_row, index.match(user_words, user_ids), strict=True):
        if match is not None and not contamination[r]:
            contamination[r] = json.dumps(match.__dict__, sort_keys=True, ensure_ascii=False)
    cols = {"prompt_hash": pa.array(keys, pa.string()),
            "contamination": pa.array(contamination, pa.string())}
    if perms is not None:
        sig = dedup.minhash_signatures(all_ids, p.near_dup_shingle, perms)
        cols["minhash"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.uint32()), sig.shape[1])
    return pa.table(cols)


def column(ds, name: str) -> list:
    """A whole column as a Python list (one Arrow conversion, not one lookup per row)."""
    return ds.with_format("arrow")[name].to_pylist()


def filter_rows(prep, rows, data: DataParams, p: BuildParams, decon_info: dict) -> tuple[list[int], list[dict], Counter]:
    """Decide, in order, which prompt groups go on to binarization; every other one gets a reason:
    decontaminated, weight (source mixing), exact_duplicate, near_duplicate (of an earlier kept group).
    Per-row strings (ids, file:line) are looked up only for the rows that are filtered."""
    table = rows.with_format("arrow").select_columns(["id", "source", "source_file", "source_line"])[:]
    ident = table.column("id")

    def where(i: int) -> str:
        return f"{table.column('source_file')[i].as_py()}:{table.column('source_line')[i].as_py()}"

    weights = {s.name: s.weight for s in data.sources}
    sources = table.column("source").to_pylist() if any(w < 1.0 for w in weights.values()) else None
    hashes, contamination = column(prep, "prompt_hash"), column(prep, "contamination")
    reasons: dict[int, tuple[str, Any]] = {}
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if contamination[i]:
            m = json.loads(contamination[i])
            reasons[i] = ("decontaminated", m)
            decon_info[m["eval_set"]]["removed"] += 1
            decon_info[m["eval_set"]]["rows"].append({"id": ident[i].as_py(), "source_row": where(i), "match": m["kind"],
                                                      "eval_item": m["item"], "eval_text": m["text"]})
        elif sources is not None and weights.get(sources[i], 1.0) < 1.0 and unit("weight", p.seed, h) >= weights[sources[i]]:
            reasons[i] = ("weight", None)
        elif h in first:
            reasons[i] = ("exact_duplicate", {"of": ident[first[h]].as_py()})
        else:
            first[h] = i
    del first, contamination
    if "minhash" in prep.column_names:
        eligible = np.array([i for i in range(len(hashes)) if i not in reasons], dtype=np.int64)
        arr = prep.with_format("arrow")["minhash"]
        arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
        sigs = arr.flatten().to_numpy().reshape(len(prep), -1)[eligible]
        for k, (j, jac) in dedup.near_duplicates(sigs, p.near_dup_threshold, p.near_dup_num_perm).items():
            reasons[int(eligible[k])] = ("near_duplicate", {"of": ident[int(eligible[j])].as_py(),
                                                            "jaccard": round(jac, 4)})
        del sigs
    kept, filtered, counts = [], [], Counter()
    for i in range(len(hashes)):
        if i not in reasons:
            kept.append(i)
            continue
        reason, detail = reasons[i]
        counts[reason] += 1
        if reason == "decontaminated":
            counts[f"decontaminated.{detail['eval_set']}"] += 1
        filtered.append({"id": ident[i].as_py(), "source_row": where(i), "reason": reason, "detail": detail})
    return kept, filtered, counts
