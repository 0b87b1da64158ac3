"""Running one benchmark variant in its own process: peak RSS and the CPU runtime are then its own.

The child prints `RESULT {json}` on stdout (`report`); the parent reads that line (`run`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PREFIX = "RESULT "


def report(result: dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], label: str) -> dict:
    """The child's RESULT; its stderr tail and a non-zero exit naming `label` when it has none."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(PREFIX)), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{label} failed with status {proc.returncode}")
    return json.loads(line.removeprefix(PREFIX))
