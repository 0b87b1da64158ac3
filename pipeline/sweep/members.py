"""The sweep's members: every configuration of the grid times every seed, named deterministically.

A member is nothing but a set of params overrides; `dvc exp run -S key=value ... evaluate` trains and
evaluates it. The same command line runs in DVC's local queue, a SLURM array task or a Kubernetes Job.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.lineage import sha256_json
from pipeline.core.params.sweep import SweepParams

TARGET = "evaluate"  # members stop here: card and publish run once, on the winner


def format_value(v: Any) -> str:
    """A value in DVC's `-S key=value` (Hydra override) syntax."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _slug(v: Any) -> str:
    text = format_value(v).strip("[]{}")
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._") or "x"


@dataclass(frozen=True)
class Member:
    name: str                       # the DVC experiment name
    index: int                      # position in grid order
    config_index: int               # which configuration (seeds of one configuration share it)
    config: dict[str, Any] = field(hash=False)  # axis key -> value
    seed: int = 0

    def overrides(self, seed_key: str) -> dict[str, Any]:
        return {**self.config, seed_key: self.seed}

    def command(self, seed_key: str, queue: bool = False, copy_paths: tuple[str, ...] = ()) -> list[str]:
        """The member's `dvc exp run`. A queued run works in a temporary copy of the workspace that has
        only what git tracks plus the DVC cache, so `copy_paths` brings the untracked, uncached stage
        outputs (lineage records, reports) that keep the upstream stages from rerunning there."""
        cmd = ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", self.name]
        for path in copy_paths if queue else ():
            cmd += ["-C", path]
        for key, value in self.overrides(seed_key).items():
            cmd += ["-S", f"{key}={format_value(value)}"]
        return [*cmd, TARGET]

    def command_line(self, seed_key: str, queue: bool = False, copy_paths: tuple[str, ...] = ()) -> str:
        return shlex.join(self.command(seed_key, queue, copy_paths))


def sweep_id(sweep: SweepParams) -> str:
    """Names the grid: the same axes, seed key and seeds give the same member names."""
    return sha256_json({"axes": sweep.axes, "seed_key": sweep.seed_key, "seeds": sweep.seeds})[:8]


def configs(sweep: SweepParams) -> list[dict[str, Any]]:
    keys = list(sweep.axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep.axes[k] for k in keys))]


def expand(sweep: SweepParams) -> list[Member]:
    """Configurations in grid order (the product of the axes, first axis slowest), each with every seed."""
    sid = sweep_id(sweep)
    out = []
    for ci, config in enumerate(configs(sweep)):
        label = "-".join(f"{k.split('.')[-1]}{_slug(v)}" for k, v in config.items())
        for seed in sweep.seeds:
            out.append(Member(name=f"sweep-{sid}-{label}-s{seed}"[:200], index=len(out), config_index=ci,
                              config=config, seed=seed))
    if len({m.name for m in out}) != len(out):  # slugs can collide (1.0 vs 1_0): fall back to indices
        out = [Member(f"sweep-{sid}-c{m.config_index}-s{m.seed}", m.index, m.config_index, m.config, m.seed)
               for m in out]
    return out


def config_label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={json.dumps(v)}" for k, v in config.items())
