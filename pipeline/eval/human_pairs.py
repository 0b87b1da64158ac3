"""The human-labelled pairs the default evaluation measures its judge on (`data/judge/human_pairs.jsonl`).

Source: Anthropic's hh-rlhf, `harmless-base/test.jsonl.gz` (MIT): whole transcripts `chosen` and
`rejected` that share every turn but the last assistant reply, and a person chose `chosen`.
`select_pairs(lines, n, seed, max_chars)` is the whole selection rule:

1. keep a line when both transcripts are exactly one `Human:` turn and one `Assistant:` turn, the
   Human turn is the same in both, both replies are non-blank and differ, and instruction plus both
   replies hold at most `max_chars` characters (short judge prompts keep the judge's cost small);
2. `random.Random(seed).sample` of `n` of those, in source-line order;
3. the same generator then shuffles n//2 "A" and n - n//2 "B" labels: "A" puts the chosen reply
   first. So the label is not a constant, and a judge that always answers one letter agrees half
   the time and gets kappa 0.

`python -m pipeline.eval.human_pairs SRC DEST N SEED MAX_CHARS` writes DEST (JSON lines that
`pipeline.eval.judge_agreement.read_labeled_pairs` reads) and `DEST.with_suffix(".meta.json")`
(source, rule, counts); tests/test_human_pairs.py rebuilds the file from ../shared/data and compares.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

SOURCE = {"repository": "anthropics/hh-rlhf", "commit": "354e5c3", "path": "harmless-base/test.jsonl.gz",
          "license": "MIT"}
RULE = ("single-turn (one Human and one Assistant turn, same Human turn), both replies non-blank and different, "
        "len(instruction + chosen + rejected) <= max_chars; random.Random(seed).sample(eligible in line order, n), "
        "sorted by line; the same generator shuffles n//2 'A' and n - n//2 'B' labels ('A': chosen reply shown first)")
_TURN = re.compile(r"\n\n(Human|Assistant):")


def single_turn(text: str) -> tuple[str, str] | None:
    """(instruction, reply) of a transcript that is one Human turn then one Assistant turn, else None."""
    parts = _TURN.split(text)
    if len(parts) != 5 or parts[0].strip() or parts[1] != "Human" or parts[3] != "Assistant":
        return None
    return parts[2].strip(), parts[4].strip()


def eligible(lines: list[dict]) -> list[tuple[int, str, str, str]]:
    """(1-based line, instruction, chosen reply, rejected reply) of every single-turn pair with two replies."""
    out = []
    for number, rec in enumerate(lines, start=1):
        c, r = single_turn(rec["chosen"]), single_turn(rec["rejected"])
        if c is None or r is None or c[0] != r[0] or not c[0]:
            continue
        if c[1] and r[1] and c[1] != r[1]:
            out.append((number, c[0], c[1], r[1]))
    return out


def select_pairs(lines: list[dict], n: int, seed: int, max_chars: int) -> list[dict]:
    pool = [e for e in eligible(lines) if len(e[1]) + len(e[2]) + len(e[3]) <= max_chars]
    if n > len(pool):
        raise ValueError(f"{n} pairs asked, {len(pool)} eligible with max_chars {max_chars}")
    rng = random.Random(seed)
    picked = sorted(rng.sample(pool, n))
    labels = ["A"] * (n // 2) + ["B"] * (n - n // 2)
    rng.shuffle(labels)
    rows = []
    for (number, instruction, chosen, rejected), label in zip(picked, labels, strict=True):
        a, b = (chosen, rejected) if label == "A" else (rejected, chosen)
        rows.append({"id": f"{SOURCE['path']}:{number}", "instruction": instruction, "response_a": a,
                     "response_b": b, "label": label})
    return rows


def read_source(path: str | Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    src, dest, n, seed, max_chars = (argv if argv is not None else sys.argv[1:])
    lines = read_source(src)
    rows = select_pairs(lines, int(n), int(seed), int(max_chars))
    dest = Path(dest)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    meta = {"source": SOURCE, "source_rows": len(lines), "single_turn_pairs": len(eligible(lines)),
            "size": len(rows), "seed": int(seed), "max_chars": int(max_chars), "rule": RULE,
            "labels": {"A": sum(r["label"] == "A" for r in rows), "B": sum(r["label"] == "B" for r in rows)}}
    dest.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
