"""Turning a prompt group's rated completions into (chosen, rejected) pairs.

A completion's score is the mean of its available ratings (null / "N/A" ignored); a completion with no
rating is left out. Methods:
- best_vs_worst: the highest against the lowest score (one pair per prompt);
- best_vs_random: the highest against a random one scoring lower by at least the margin, drawn with
  a generator seeded by (seed, prompt hash) (Zephyr's recipe; one pair per prompt);
- all_pairs_above_margin: every pair of completions whose scores differ by at least the margin.
Ties (equal scores) are never pairs; differences below `min_margin` are dropped; both are counted.
Among equal scores the earlier completion wins, so results depend only on the data and the seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

METHODS = ("best_vs_worst", "best_vs_random", "all_pairs_above_margin")


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


def pairs_for(scores: list[float | None], method: str, min_margin: float, seed: int, prompt_hash: str
              ) -> tuple[list[tuple[int, int]], Counter]:
    """Pairs (index chosen, index rejected) for one group, and a Counter of what was dropped:
    `unrated` completions, candidate pairs dropped as `tie` / `below_margin`, and `too_few_rated`
    (fewer than two rated completions; no candidate pair at all)."""
    dropped: Counter = Counter()
    rated = [(i, s) for i, s in enumerate(scores) if s is not None]
    dropped["unrated"] = len(scores) - len(rated)
    if len(rated) < 2:
        dropped["too_few_rated"] += 1
        return [], dropped
    best = max(rated, key=lambda t: (t[1], -t[0]))
    if method == "best_vs_worst":
        worst = min(rated, key=lambda t: (t[1], t[0]))
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
