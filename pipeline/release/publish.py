"""`openrelease publish`: run the gates, then publish model + dataset to the Hub (or a dry run to a folder).

A real publish rebuilds the bundle from the committed, tagged tree (the bundle a `dvc repro` wrote was
made mid-run, from a tree dirty with dvc.lock updates), enforces every gate, uploads the dataset repo
and then the model repo in one commit each, tags both with the version, and records the commits in a
`publish` MLflow run. The token comes from HF_TOKEN only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.params import Params, load_params
from pipeline.release.bundle import Bundle, build_bundle

log = logging.getLogger(__name__)


def dry_run(params: Params, root: Path, to: Path, *, strict: bool = False, version: str | None = None,
            check_dvc: bool = True, require_reproduced_lock: bool = False, **repos: str | None) -> Bundle:
    """Write exactly what would be uploaded to `to` (model/ and dataset/); environment gates only warn."""
    return build_bundle(params, root, to, dry_run=True, strict=strict, version=version, check_dvc=check_dvc,
                        require_reproduced_lock=require_reproduced_lock, **repos)


def publish(params: Params, root: Path, *, version: str | None = None, keep: Path | None = None,
            require_reproduced_lock: bool = False, **repos: str | None) -> tuple[Bundle, list[Any]]:
    """Build the bundle with every gate enforced, then publish it. Returns the bundle and what was done.

    The MLflow run is opened before anything is uploaded (an unreachable server stops the release
    first) and records the version, the repos and the Hub commits, never the token.
    """
    from pipeline.core import tracking
    from pipeline.core.lineage import git_state, sha256_json
    from pipeline.release import hub

    token = hub.token_from_env()   # fail before any work when it is missing
    hub.check_online()
    tracking.check_reachable(tracking.default_tracking_uri(root), params.tracking.connect_timeout_s)
    with tempfile.TemporaryDirectory(prefix="openrelease-publish-") as tmp:
        out = keep or Path(tmp) / "bundle"
        bundle = build_bundle(params, root, out, dry_run=False, version=version,
                              require_reproduced_lock=require_reproduced_lock, **repos)
        info = bundle.info
        logged = {"version": info.version, "model_repo": info.model_repo, "dataset_repo": info.dataset_repo,
                  "endpoint": info.endpoint, "commit": info.commit}
        with tracking.stage_run("publish-hub", params.tracking.experiment, sha256_json(logged), git_state(root),
                                root=root, timeout_s=params.tracking.connect_timeout_s) as run:
            run.log_params(logged)
            run.log_artifact(out / "model" / "manifest.json", artifact_path="release")
            done = hub.publish_bundle(bundle.path, info, params.publish.private, token)
            run.set_tags({f"openrelease.hub.{p.repo_type}": f"{p.repo_id}@{p.version} {p.commit} ({p.action})"
                          for p in done})
    return bundle, done


def _cmd_publish(args: argparse.Namespace) -> int:
    from pipeline.core.errors import GateError

    try:
        return _publish_cli(args)
    except GateError as e:
        for g in getattr(e, "results", []):
            print(g.line(), file=sys.stderr)
        raise


def _publish_cli(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    root = Path.cwd()
    repos = {"model_repo": args.model_repo, "dataset_repo": args.dataset_repo, "endpoint": args.endpoint}
    if args.dry_run:
        to = args.to or root / params.paths.release
        bundle = dry_run(params, root, to, strict=args.strict, version=args.version,
                         require_reproduced_lock=args.require_reproduced_lock, **repos)
        for g in bundle.gates:
            print(g.line())
        print(f"dry run: release {bundle.info.version} written to {to} ({to / 'model'}, {to / 'dataset'}); "
              f"check it with `openrelease audit {to}`")
        return 0
    bundle, done = publish(params, root, version=args.version, keep=args.to,
                           require_reproduced_lock=args.require_reproduced_lock, **repos)
    for g in bundle.gates:
        print(g.line())
    for p in done:
        print(p.line())
    print(f"published release {bundle.info.version}: {bundle.info.endpoint}/{bundle.info.model_repo} and "
          f"{bundle.info.endpoint}/datasets/{bundle.info.dataset_repo}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("publish", help="run the release gates and publish model + dataset to the Hub")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded instead (see --to)")
    p.add_argument("--to", type=Path, default=None,
                   help="dry run: the folder to write (default paths.release); real: keep the bundle here")
    p.add_argument("--version", default=None, help="release version / Hub tag (default: the git tag at HEAD)")
    p.add_argument("--strict", action="store_true", help="dry run: enforce the git and dvc gates too")
    p.add_argument("--require-reproduced-lock", action="store_true",
                   help="CI's reproduce path: after `dvc repro` from the tag, refuse unless dvc.lock equals the "
                        "committed one for every stage but card and publish (gate dvc-lock-reproduced)")
    p.add_argument("--model-repo", default=None, help="override publish.model_repo")
    p.add_argument("--dataset-repo", default=None, help="override publish.dataset_repo")
    p.add_argument("--endpoint", default=None, help="override publish.endpoint (the Hub URL)")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p.set_defaults(func=_cmd_publish)
