"""Turning a prompt group's rated completions into (chosen, rejected) pairs.

A completion's score is the mean of its available ratings (null / "N/A" ignored); a completion with no
rating is left out. Methods:
- best_vs_worst: the highest against the lowest score (one pair per prompt);
- best_vs_worst_length_matched: as best_vs_worst, but among the completions sharing the lowest score
  the one closest in length (characters) to the chosen one is rejected, so a pair differs in what
  was followed rather than in how long it ran (with on-policy data, the lowest score is shared by
  answers cut at max_new_tokens and short ones that broke an instruction; picking the cut, longer
  one teaches brevity, a length shortcut DPO is known to take);
- best_vs_random: the highest against a random one scoring lower by at least the margin, drawn with
  a generator seeded by (seed, prompt hash) (Zephyr's recipe; one pair per prompt);
- all_pairs_above_margin: every pair of completions whose scores differ by at least the margin.
Ties (equal scores) are never pairs; differences below `min_margin` are dropped; both are counted.
Among equal scores the earlier completion wins, so results depend only on the data and the seed.

Each pair says whether its chosen and its rejected reply was cut at the generator's max_new_tokens
(`chosen_cut`, `rejected_cut`): the negation of the completion's `finished` flag, null where the source
does not say (every external source; see pipeline.data.formats.common).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import numpy as np

from pipeline.core.params import BuildParams
from pipeline.data.filtering import unit

METHODS = ("best_vs_worst", "best_vs_worst_length_matched", "best_vs_random", "all_pairs_above_margin")


def score(ratings: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in ratings if v is not None]
    return sum(vals) / len(vals) if vals else None


def _judge(diff: float, min_margin: float) -> str | None:
    """None when a score difference makes a pair, else why not."""
    if diff <= 0:
        return "tie"
    if diff < min_margin:
        return "below_margin"
    return None


def pairs_for(scores: list[float | None], method: str, min_margin: float, seed: int, prompt_hash: str,
              lengths: list[int] | None = None) -> tuple[list[tuple[int, int]], Counter]:
    """Pairs (index chosen, index rejected) for one group, and a Counter of what was dropped:
    `unrated` completions, candidate pairs dropped as `tie` / `below_margin`, and `too_few_rated`
    (fewer than two rated completions; no candidate pair at all). `lengths`: each completion's length,
    needed by best_vs_worst_length_matched."""
    dropped: Counter = Counter()
    rated = [(i, s) for i, s in enumerate(scores) if s is not None]
    dropped["unrated"] = len(scores) - len(rated)
    if len(rated) < 2:
        dropped["too_few_rated"] += 1
        return [], dropped
    best = max(rated, key=lambda t: (t[1], -t[0]))
    if method in ("best_vs_worst", "best_vs_worst_length_matched"):
        worst = min(rated, key=lambda t: (t[1], t[0]))
        if method == "best_vs_worst_length_matched":
            if lengths is None:
                raise ValueError("best_vs_worst_length_matched needs the completions' lengths")
            target = lengths[best[0]]
            worst = min((t for t in rated if t[1] == worst[1]), key=lambda t: (abs(lengths[t[0]] - target), t[0]))
        why = _judge(best[1] - worst[1], min_margin)
        if why:
            dropped[why] += 1
            return [], dropped
        return [(best[0], worst[0])], dropped
    if method == "best_vs_random":
        lower = [i for i, s in rated if _judge(best[1] - s, min_margin) is None]
        if not lower:
            dropped["tie" if all(s == best[1] for _, s in rated) else "below_margin"] += 1
            return [], dropped
        return [(best[0], random.Random(f"{seed}:{prompt_hash}").choice(lower))], dropped
    if method == "all_pairs_above_margin":
        out = []
        for x in range(len(rated)):
            for y in range(x + 1, len(rated)):
                (i, si), (j, sj) = rated[x], rated[y]
                hi, lo = ((i, si), (j, sj)) if si >= sj else ((j, sj), (i, si))
                why = _judge(hi[1] - lo[1], min_margin)
                if why:
                    dropped[why] += 1
                else:
                    out.append((hi[0], lo[0]))
        return out, dropped
    raise ValueError(f"unknown binarization method {method!r}; expected one of {METHODS}")


def completion_scores(completions) -> tuple[np.ndarray, np.ndarray]:
    """Score of every completion of a list<struct<content, generator, ratings>> Arrow array (NaN when
    unrated), and the row each completion belongs to."""
    import pyarrow.compute as pc

    flat = completions.flatten()
    row_of = pc.list_parent_indices(completions).to_numpy()
    ratings = flat.field("ratings")
    values = ratings.flatten().field("value").to_numpy(zero_copy_only=False)
    owner = pc.list_parent_indices(ratings).to_numpy()
    ok = ~np.isnan(values)
    total = np.bincount(owner[ok], weights=values[ok], minlength=len(flat))
    count = np.bincount(owner[ok], minlength=len(flat))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), row_of


def binarize_table(batch, prompt_hashes: list[str], method: str | list[str], min_margin: float, seed: int
                   ) -> tuple[list[int], list[int], list[int], np.ndarray, list[tuple[int, Counter]]]:
    """Pairs of a batch of prompt groups (an Arrow table with a `completions` column).

    Returns the row, chosen and rejected completion (indices into the batch's flattened completions) of
    every pair, the completion scores, and per row its drop Counter (see `pairs_for`).
    """
    import pyarrow.compute as pc

    comps = batch.column("completions").combine_chunks()
    scores, row_of = completion_scores(comps)
    flat = comps.flatten()
    # lengths serve best_vs_worst_length_matched only; a table of bare ratings has none to give
    lengths = (pc.utf8_length(flat.field("content")).to_numpy(zero_copy_only=False)
               if flat.type.get_field_index("content") >= 0 else None)
    bounds = np.searchsorted(row_of, np.arange(batch.num_rows + 1))
    methods = [method] * batch.num_rows if isinstance(method, str) else method
    rows, chosen, rejected, drops = [], [], [], []
    for r in range(batch.num_rows):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        s = [None if np.isnan(x) else float(x) for x in scores[lo:hi]]
        pairs, dropped = pairs_for(s, methods[r], min_margin, seed, prompt_hashes[r],
                                   None if lengths is None else lengths[lo:hi].tolist())
        drops.append((r, dropped))
        for ci, ri in pairs:
            rows.append(r)
            chosen.append(lo + ci)
            rejected.append(lo + ri)
    return rows, chosen, rejected, scores, drops


def held_out_prompts(hashes: list[str], seed: int, fraction: float) -> set[str]:
    """The held-out prompt hashes: exactly round(fraction x distinct prompts) of them, those with the lowest
    seeded hash. A per-prompt coin flip would let the test size wander (seed 42 put 6 of 83 paired
    prompts in a 0.2 test split of the default data), and every prompt still has the same chance."""
    distinct = sorted(set(hashes), key=lambda h: (unit("split", seed, h), h))
    return set(distinct[: round(fraction * len(distinct))])


def binarize_batch(batch, indices: list[int], p: BuildParams, hashes: list[str], test: set[str], features,
                   no_pair: list, counts: Counter):
    """Arrow batch of prompt groups -> Arrow table of pairs (contract columns + provenance)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h = [hashes[i] for i in indices]
    # The split is a function of the prompt alone, so it is known before pairing; each split has its rule.
    row_split = ["test" if x in test else "train" for x in h]
    rule = {"train": p.binarize, "test": p.test_binarize or p.binarize}
    rows, ci, ri, scores, drops = binarize_table(batch, h, [rule[s] for s in row_split], p.min_margin, p.seed)
    ids, files, lines = (batch.column(c).to_pylist() for c in ("id", "source_file", "source_line"))
    comps = batch.column("completions").combine_chunks()
    offsets = np.searchsorted(pc.list_parent_indices(comps).to_numpy(), np.arange(batch.num_rows + 1))
    paired = set(rows)
    for r, dropped in drops:
        counts.update(dropped)
        if r not in paired:
            why = next(k for k in ("too_few_rated", "tie", "below_margin") if dropped.get(k))
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            no_pair.append({"id": ids[r], "source_row": f"{files[r]}:{lines[r]}", "reason": f"no_pair:{why}",
                            "detail": {"scores": [None if np.isnan(x) else float(x) for x in scores[lo:hi]]}})
    flat = comps.flatten()
    take_r, take_c, take_j = pa.array(rows, pa.int64()), pa.array(ci, pa.int64()), pa.array(ri, pa.int64())
    n = len(rows)

    def assistant(contents):
        msg = pa.StructArray.from_arrays([pa.array(["assistant"] * n, pa.string()), contents], names=["role", "content"])
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), msg)

    splits = [row_split[r] for r in rows]
    cut = (pc.invert(flat.field("finished")) if flat.type.get_field_index("finished") >= 0
           else pa.nulls(len(flat), pa.bool_()))  # rows validated before the flag existed: unknown
    cols = {
        "id": pa.array([f"{ids[r]}#{c - offsets[r]}>{j - offsets[r]}" for r, c, j in zip(rows, ci, ri, strict=True)],
                       pa.string()),
        "prompt": batch.column("prompt").combine_chunks().take(take_r),
        "chosen": assistant(flat.field("content").take(take_c)),
        "rejected": assistant(flat.field("content").take(take_j)),
        "chosen_cut": cut.take(take_c),
        "rejected_cut": cut.take(take_j),
        "score_chosen": pa.array(scores[ci] if n else [], pa.float64()),
        "score_rejected": pa.array(scores[ri] if n else [], pa.float64()),
        "source": batch.column("source").combine_chunks().take(take_r),
        "source_row": pa.array([f"{files[r]}:{lines[r]}" for r in rows], pa.string()),
        "rule": pa.array([rule[s] for s in splits], pa.string()),
        "prompt_hash": pa.array([h[r] for r in rows], pa.string()),
        "license": batch.column("license").combine_chunks().take(take_r),
        "generator_chosen": flat.field("generator").take(take_c),
        "generator_rejected": flat.field("generator").take(take_j),
        "ratings_chosen": flat.field("ratings").take(take_c),
        "ratings_rejected": flat.field("ratings").take(take_j),
        "seed": pa.array([p.seed] * n, pa.int64()),
        "split": pa.array(splits, pa.string()),
        # the raw records behind the pair, so a release alone shows no pair derives from a taken-down one
        "record_sha256": batch.column("record_sha256").combine_chunks().take(take_r),
    }
    return pa.table(cols).cast(features.arrow_schema)


def pair_features():
    from datasets import Features, List, Value

    msg = {"role": Value("string"), "content": Value("string")}
    s = Value("string")
    rating = List({"aspect": Value("string"), "value": Value("float64")})
    return Features({"id": s, "prompt": List(msg), "chosen": List(msg), "rejected": List(msg),
                     "chosen_cut": Value("bool"), "rejected_cut": Value("bool"), "score_chosen": Value("float64"), "score_rejected": Value("float64"), "source": s,
                     "source_row": s, "rule": s, "prompt_hash": s, "license": s, "generator_chosen": s,
                     "generator_rejected": s, "ratings_chosen": rating, "ratings_rejected": rating,
                     "seed": Value("int64"), "split": s, "record_sha256": List(Value("string"))})
