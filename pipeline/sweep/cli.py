"""`openrelease sweep`: run the grid in params.yaml's `sweep:` section as DVC experiments."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.core.params import load_params
    from pipeline.sweep import run
    from pipeline.sweep.members import config_label

    params = load_params(args.params)
    root = Path(".").resolve()
    if args.print_members:  # one ordinary `dvc exp run` per line: for a SLURM array, a Kubernetes Job, Ray
        if params.sweep is None:
            raise run.SweepError("params.yaml: sweep: is null; nothing to print")
        for m in run.expand(params.sweep):
            print(m.command_line(params.sweep.seed_key))
        return 0
    if args.dry_run:
        members, times = run.plan(params, root)
        for m in members:
            print(f"{m.name}\t{config_label(m.config)}\tseed={m.seed}")
        per = sum(times.values())
        if per:
            print(f"{len(members)} members; the last run took train {times.get('train', 0):.0f}s + evaluate "
                  f"{times.get('evaluate', 0):.0f}s, so about {len(members) * per / 60:.0f} min at "
                  f"{params.sweep.jobs} job(s) on this machine (plus one reference pass and the final card/publish)")
        else:
            print(f"{len(members)} members; no train/evaluate run in MLflow yet, so no cost estimate")
        return 0
    table = run.run_sweep(params, root, release=not args.no_release, collect_only=args.collect)
    w = table["winner"]
    wall = f"{table['wall_s']:.0f}s" if table.get("wall_s") is not None else "collected"
    print(f"sweep {table['sweep_id']}: {len(table['members'])} members, {table['reference_passes']} reference "
          f"pass(es), {wall}; winner {w['label']} ({w['metric']} mean {w['mean']:.4g}, "
          f"Holm p {w['p_vs_base_holm']}); released {w['release_member']}" if w else "no winner")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("sweep", help="train and evaluate the grid of params.yaml `sweep:` as DVC experiments")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the members and the estimated cost, run nothing")
    p.add_argument("--print-members", action="store_true",
                   help="print one `dvc exp run` command per member (for a cluster scheduler) and exit")
    p.add_argument("--no-release", action="store_true", help="stop after the sweep table; do not apply the winner")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: build the table from the members DVC already has (e.g. after `dvc exp pull`)")
    p.set_defaults(func=_cmd_sweep)
