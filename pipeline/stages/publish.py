"""Stage `publish`: the dry-run release bundle that `dvc repro` ends with.

Reads:  everything the `card` stage reads, plus `paths.test_prompts` (and the other evaluation prompt
        files) for the contamination gate; params `publish`, `card`, `base_model`, `data`, `train`,
        `evaluate`, `paths`.
Writes: `paths.release/model/` and `paths.release/dataset/`: exactly what `openrelease publish` would
        upload to the two Hub repos (weights, cards, manifest.json, model.sig, signing-key.pub,
        bom.cdx.json, eval results, the source archive, report.html; Parquet splits, reports and the
        Great Expectations Data Docs with their run times), and
        `paths.lineage/publish.json` (the gates' verdicts). `paths.release` is not a DVC output: a
        signed, dated bundle differs on every run; its sha256 is in the run record.
Run:    `dvc repro publish` (or `python -m pipeline.stages.publish`); check the result with
        `openrelease audit release`. Publishing for real is `openrelease publish` (see its --help).

Inside `dvc repro` the git tree is dirty (dvc.lock is being rewritten) and DVC holds its lock, so the
git and dvc gates are recorded as warnings in the manifest here; `openrelease publish` enforces them.
Every other gate (validation, lineage, eval thresholds, regression, contamination, licenses, secrets)
fails this stage. The bundle is signed and audited before it is renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.params import Params
from pipeline.core.stage import StageContext, stage_main
from pipeline.release.bundle import Bundle
from pipeline.release.publish import dry_run

STAGE = "publish"
READS = ["publish", "card", "base_model", "data", "train", "evaluate", "sweep", "paths"]

log = logging.getLogger(__name__)


def run(params: Params, root: Path, out: Path) -> Bundle:
    """Build the dry-run bundle into `out` (gates, cards, manifest, signature, self-audit)."""
    return dry_run(params, root, out, check_dvc=False)


def _body(ctx: StageContext) -> None:
    from pipeline.core.lineage import sha256_file, sha256_path

    ctx.add_input(ctx.path("model"), log_dataset=False)
    ctx.add_input(ctx.path("dataset"))
    out = ctx.path("release")
    bundle = run(ctx.params, ctx.root, out)
    gates = {g.name: g.status for g in bundle.gates}
    ctx.record.extra.update(gates=gates)
    # The bundle is signed (ECDSA signatures are randomised), dated and may use a locally generated key,
    # so no two runs match: it is not a DVC output, and its facts are run facts, not lineage.
    ctx.run_facts.update(release=bundle.info.to_dict(), bundle_sha256=sha256_path(out),
                         manifest_sha256=sha256_file(out / "model" / "manifest.json"))
    ctx.run.set_tags({"release.version": bundle.info.version,
                      **{f"gate.{k}": v for k, v in gates.items()}})
    ctx.run.log_artifact(out / "model" / "manifest.json", artifact_path="release")
    warned = [g.line() for g in bundle.gates if g.status == "warn"]
    log.info("dry-run release %s in %s (%d warning(s)); audit it with `openrelease audit %s`",
             bundle.info.version, ctx.params.paths.release, len(warned), ctx.params.paths.release)


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
