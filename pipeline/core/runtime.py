"""CPU runtime settings fixed before torch starts: the memory allocator and OpenMP's wait policy.

Neither changes a single number the stages compute; both change how fast they compute it on CPU. On
the 2-core machine (bench/bench_train.py and bench/bench_generate.py, BENCHMARKS.md "CPU runtime"):

- **Allocator.** glibc returns large freed blocks to the kernel, so every new activation or logits
  tensor of a training step faults its pages in again (a fresh [442, 32768] fp32 tensor: 16 ms to
  multiply, 4.5 ms into an existing one; 23 ms of system time per call). tcmalloc keeps them: training
  ran 15-18% faster with 25% less peak RSS. It must be loaded when the process starts (LD_PRELOAD), so
  `tune()` re-executes the stage once with it when the library is installed (Debian/Ubuntu:
  libtcmalloc-minimal4). `OPENRELEASE_ALLOCATOR=system` keeps glibc's.
- **OpenMP wait policy.** Passive waiting puts torch's worker threads to sleep after every parallel
  region; on an idle machine waking them cost 25-35% of training time and ~15% of decoding time against
  ACTIVE (spinning). Spinning on cores that other processes use is far worse (generation 6x, training
  > 10x slower, measured in an earlier round), so `tune()` spins only when the other processes used
  less than half a core over a short sample of /proc/stat, and waits passively otherwise. An
  OMP_WAIT_POLICY already in the environment is always kept (the Makefile's tests set PASSIVE).

What was chosen goes to the stage's run record (`cpu_runtime`), not to lineage: results do not depend on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV_ALLOCATOR = "OPENRELEASE_ALLOCATOR"  # "auto" (tcmalloc when found) | "system"
ENV_MARK = "OPENRELEASE_CPU_RUNTIME"  # JSON of what tune() chose; also stops a second re-exec
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# Spin only while the other processes keep less than this many cores busy.
MAX_OTHER_BUSY_CORES = 0.5


def find_tcmalloc(dirs: tuple[str, ...] | None = None) -> str | None:
    """Path of an installed tcmalloc shared library (the environment's own lib folder first), or None."""
    search = dirs if dirs is not None else (str(Path(sys.prefix) / "lib"), *LIB_DIRS)
    for d in search:
        for name in TCMALLOC_NAMES:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; steal counts as busy (the host is using the core)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def other_busy_cores(window_s: float = 0.2) -> float:
    """Cores kept busy by other processes over `window_s` (this process sleeps meanwhile); 0 off Linux."""
    try:
        b0, t0 = _cpu_jiffies()
        time.sleep(window_s)
        b1, t1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (b1 - b0) / max(t1 - t0, 1)


def plan(environ: dict[str, str], *, tcmalloc: str | None, busy_cores: float) -> dict[str, str]:
    """The environment variables to add for this stage process (a pure function, for tests)."""
    changes: dict[str, str] = {}
    preload = environ.get("LD_PRELOAD", "")
    if environ.get(ENV_ALLOCATOR, "auto") != "system" and tcmalloc and tcmalloc not in preload.split(":"):
        changes["LD_PRELOAD"] = ":".join(p for p in (tcmalloc, preload) if p)
        if "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in environ:  # no "large alloc" lines for the 1 GB+ buffers
            changes["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)
    if "OMP_WAIT_POLICY" not in environ:
        changes["OMP_WAIT_POLICY"] = "ACTIVE" if busy_cores < MAX_OTHER_BUSY_CORES else "PASSIVE"
    return changes


def facts(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """What this process runs with: allocator, OpenMP wait policy and why (for the run record)."""
    environ = os.environ if environ is None else environ
    chosen = json.loads(environ.get(ENV_MARK, "{}") or "{}")
    preload = environ.get("LD_PRELOAD", "")
    return {"allocator": "tcmalloc" if "tcmalloc" in preload else "system",
            "omp_wait_policy": environ.get("OMP_WAIT_POLICY", "default"), **chosen}


def tune() -> None:
    """Call first in `if __name__ == "__main__":` of a torch stage, before torch is imported.

    Sets OMP_WAIT_POLICY when unset; when tcmalloc is installed and not loaded, re-executes the same
    command line once with it preloaded (an allocator cannot be swapped in a running process).
    """
    if ENV_MARK in os.environ:
        return
    busy = other_busy_cores() if "OMP_WAIT_POLICY" not in os.environ else None
    changes = plan(dict(os.environ), tcmalloc=find_tcmalloc(), busy_cores=busy or 0.0)
    note = {"other_busy_cores": round(busy, 2)} if busy is not None else {}
    os.environ.update({k: v for k, v in changes.items() if k != "LD_PRELOAD"})
    os.environ[ENV_MARK] = json.dumps(note)
    if "LD_PRELOAD" in changes:
        env = {**os.environ, "LD_PRELOAD": changes["LD_PRELOAD"]}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
