"""Benchmarks' summary for CI: nothing gets slower unseen.

    .venv/bin/python bench/quick.py

Runs each benchmark on a tiny workload, baseline and candidate side by side in the same run, and fails
(exit 1, one line per regression) only when a candidate is more than 2x slower than its baseline. It
never compares with an absolute time, so a slow or busy CI machine does not fail it; it catches a change
that breaks a speed-up (a cache that stops hitting, a decoding loop that falls off its fast path).

- stage start: bench_stage_start.py on `card`, the tracking worker against MLflow in the stage process;
- decoding: bench_generate.py --tiny, the stages' decoding loop against transformers' `model.generate`,
  sampling and greedy, new tokens per wall second;
- scoring: bench_scoring.py --tiny, evaluate's shared-prefix log-probs, KL and judge against the plain
  forward they replaced.

Training (bench_train.py) is not in it: its smallest honest run is several minutes on 2 cores.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT = 2.0


def run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=HERE.parent, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench/quick.py: {' '.join(args)} failed with status {proc.returncode}")
    return proc.stdout


def stage_start() -> list[tuple[str, float]]:
    out = run([str(HERE / "bench_stage_start.py"), "--stages", "card", "--repeats", "1"])
    row = next(line for line in out.splitlines() if line.startswith("| card |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    in_process, worker = float(cells[4]), float(cells[5])  # whole process, exit included
    return [("stage start (card process, worker / in-process)", worker / in_process)]


def decoding() -> list[tuple[str, float]]:
    out = run([str(HERE / "bench_generate.py"), "--tiny", "--repeats", "1", "--candidates", "transformers,loop"])
    m = re.search(r"speedup sampling ([\d.na]+) greedy ([\d.na]+)", out)
    if not m:
        raise SystemExit("bench/quick.py: bench_generate.py printed no speedup line")
    # time ratio = the inverse of the tokens/s speedup
    return [(f"decoding {w} (loop / model.generate, time)", 1 / float(v)) for w, v in zip(("sampling", "greedy"), m.groups(), strict=True)]


def scoring() -> list[tuple[str, float]]:
    out = run([str(HERE / "bench_scoring.py"), "--tiny"])
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ("preference", "kl", "judge"):
            rows.append((f"scoring {cells[0]} (shared prefix / plain forward)", float(cells[4]) / float(cells[2])))
    if len(rows) != 3:
        raise SystemExit("bench/quick.py: bench_scoring.py printed no table")
    return rows


def main() -> int:
    t0 = time.monotonic()
    rows = stage_start() + decoding() + scoring()
    print("\n| check | candidate time / baseline time | limit |\n|---|---:|---:|")
    for name, ratio in rows:
        print(f"| {name} | {ratio:.2f} | {LIMIT:.1f} |")
    print(f"\nbench/quick.py: {time.monotonic() - t0:.0f} s")
    bad = [(n, r) for n, r in rows if not r <= LIMIT]
    for name, ratio in bad:
        print(f"REGRESSION: {name}: {ratio:.2f}x the baseline's time (limit {LIMIT:.1f}x)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
