"""Caches shared by the members of a sweep.

`dvc exp run --queue` runs each experiment in a temporary copy of the workspace (.dvc/tmp/exps/...), so
a `persist: true` cache folder there starts empty and is deleted afterwards. Content-keyed caches (the
reference log-probs, the evaluation cache) are safe to share, so a member uses the main workspace's
folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_REF_LOGPS_DIR = "OPENRELEASE_REF_LOGPS_DIR"  # an explicit shared folder (e.g. on a cluster filesystem)
ENV_EVAL_CACHE_DIR = "OPENRELEASE_EVAL_CACHE_DIR"  # the same for evaluate's cache


def shared_cache_dir(root: Path, rel: str, env: str = ENV_REF_LOGPS_DIR) -> Path:
    """`env` if set; else, inside a DVC experiment workspace, the same folder of the main workspace
    (DVC sets DVC_ROOT to it); else `root/rel`. The workspace's own folder is created either way, so
    DVC finds the stage output."""
    own = root / rel
    own.mkdir(parents=True, exist_ok=True)
    if explicit := os.environ.get(env):
        return Path(explicit)
    main = os.environ.get("DVC_ROOT")
    if main and Path(main).resolve() != root.resolve():
        return Path(main) / rel
    return own
