"""The `openrelease` command: run a stage, check params, audit and publish releases.

Errors from the pipeline's own family (pipeline.core.errors) are printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.core.errors import OpenReleaseError

STAGES = ["base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate", "card", "publish"]


def _cmd_stage(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"pipeline.stages.{args.name}")
    module.main()
    return 0


def _cmd_check_params(args: argparse.Namespace) -> int:
    from pipeline.core.params import load_params

    load_params(args.file)
    print(f"{args.file}: ok")
    return 0


def _cmd_rounds(args: argparse.Namespace) -> int:
    """Print (or write into params.yaml) the rounds section for N DPO rounds (pipeline/core/rounds.py)."""
    from pathlib import Path

    import yaml

    from pipeline.core import rounds
    from pipeline.core.params import load_params, parse_params

    params = load_params(args.file)
    text = rounds.with_count(Path(args.file).read_text(encoding="utf-8"), params, args.count)
    parse_params(yaml.safe_load(text), args.file)  # the result must validate before it is written
    if args.write:
        Path(args.file).write_text(text, encoding="utf-8")
        print(f"{args.file}: rounds.count = {args.count}")
    else:
        print(yaml.safe_dump({"rounds": {"count": args.count, "later": rounds.later_block(params, args.count)}},
                             sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="openrelease", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: OPENRELEASE_LOG_LEVEL or INFO)")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name", choices=STAGES)
    p.set_defaults(func=_cmd_stage)
    p = sub.add_parser("check-params", help="validate params.yaml and exit")
    p.add_argument("file", nargs="?", default="params.yaml")
    p.set_defaults(func=_cmd_check_params)
    p = sub.add_parser("rounds", help="the rounds.count / rounds.later params for N iterative DPO rounds")
    p.add_argument("--count", type=int, required=True, help="rounds in all (1: the single pass)")
    p.add_argument("--write", action="store_true", help="set them in the params file (comments kept) instead of printing")
    p.add_argument("--file", default="params.yaml")
    p.set_defaults(func=_cmd_rounds)
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands defined next to their logic (audit, publish, ifeval, sweep); absent modules are skipped."""
    for name in ("pipeline.release.audit", "pipeline.release.report", "pipeline.release.publish", "pipeline.release.trace", "pipeline.eval.judge_agreement", "pipeline.eval.score",
                 "pipeline.constraints.cli", "pipeline.sweep.cli"):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        yield mod.register_cli


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.core.stage import configure_logging, logs_beside_bars

    level = "DEBUG" if args.verbose else "WARNING" if args.quiet else None
    if level:  # stage subprocesses (dvc, accelerate) inherit it
        os.environ["OPENRELEASE_LOG_LEVEL"] = level
    configure_logging(level)
    try:
        with logs_beside_bars():
            return args.func(args) or 0
    except OpenReleaseError as e:
        print(f"openrelease {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
