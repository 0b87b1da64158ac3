"""The fixed, seeded IFEval subset the default evaluation carries (`data/ifeval/`).

`seeded_subset(rows, n, seed)` is the whole selection rule: `random.Random(seed).sample` over the
541 rows in file order, then sorted by `key`. `python -m pipeline.eval.ifeval_subset SRC DEST N SEED`
writes DEST (JSON lines, the rows unchanged) and `DEST.with_suffix(".meta.json")` (source, seed,
size); tests/test_evaluate.py rebuilds the subset from ../shared/data and compares.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SOURCE = {"repository": "google-research/google-research", "commit": "1963839",
          "path": "instruction_following_eval/data/input_data.jsonl", "license": "Apache-2.0"}


def seeded_subset(rows: list[dict], n: int, seed: int) -> list[dict]:
    if n > len(rows):
        raise ValueError(f"subset of {n} asked from {len(rows)} rows")
    return sorted(random.Random(seed).sample(rows, n), key=lambda r: r["key"])


def meta_path(path: Path) -> Path:
    return path.with_suffix(".meta.json")


def read_meta(path: Path) -> dict | None:
    m = meta_path(Path(path))
    return json.loads(m.read_text(encoding="utf-8")) if m.is_file() else None


def main(argv: list[str] | None = None) -> int:
    src, dest, n, seed = (argv if argv is not None else sys.argv[1:])
    rows = [json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    sub = seeded_subset(rows, int(n), int(seed))
    dest = Path(dest)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sub), encoding="utf-8")
    meta = {"source": SOURCE, "source_rows": len(rows), "size": len(sub), "seed": int(seed),
            "rule": "random.Random(seed).sample(rows in file order, size), sorted by key"}
    meta_path(dest).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
