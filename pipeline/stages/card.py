"""Stage `card`: the model card and the dataset card, for review before publishing.

Reads:  `paths.model`, `paths.dataset`, `paths.metrics/{eval,data,train,generate,rate}.json`,
        `paths.eval_dir` (evaluate's per-prompt tables: the dataset config eval_answers), `paths.plots`,
        `paths.reports`, the lineage records of earlier stages and dvc.lock; params `card`,
        `base_model`, `data`, `train`, `evaluate` and the repo ids / version keys of `publish`.
Writes: `paths.cards/model/README.md` (+ the plots it shows), `paths.cards/dataset/README.md`,
        `paths.cards/release.json` (version, repos, commit, license decision), `paths.lineage/card.json`.
Run:    `dvc repro card` (or `python -m pipeline.stages.card`).

The `publish` stage renders the same cards into the bundle with the same function, so what is
reviewed here is what is published (a real `openrelease publish --version X` re-renders them with X).
Missing inputs show as *missing* in the cards; no number is ever made up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.params import Params
from pipeline.core.stage import StageContext, stage_main
from pipeline.release.bundle import license_decision, release_info
from pipeline.release.cards import write_cards
from pipeline.release.gitinfo import code_state
from pipeline.release.inputs import gather
from pipeline.release.manifest import DATASET_DIR, MODEL_DIR

STAGE = "card"
READS = ["card", "base_model", "data", "train", "evaluate", "publish.model_repo", "publish.dataset_repo",
         "publish.endpoint", "publish.version", "publish.tag_pattern", "publish.previous_release", "paths.model", "paths.dataset",
         "paths.metrics", "paths.plots", "paths.reports", "paths.cards", "paths.eval_dir"]

log = logging.getLogger(__name__)


def run(params: Params, root: Path, out_dir: Path) -> dict[str, Any]:
    """Write both cards into `out_dir/model` and `out_dir/dataset`; return the release summary."""
    from pipeline.core.rounds import release_view

    params = release_view(params, root)  # iterative DPO: the round that ships (pipeline.core.rounds)
    inp = gather(params, root)
    code = code_state(root, params.publish.version, params.publish.tag_pattern)
    info = release_info(params, code)
    lic = license_decision(inp)
    write_cards(inp, info, lic, out_dir / MODEL_DIR, out_dir / DATASET_DIR)
    summary = {"release": info.to_dict(), "license": lic.to_dict(), "stages": inp.stages(),
               "missing_metrics": [k for k, v in inp.metrics.items() if v is None]}
    atomic_write_json(out_dir / "release.json", summary)
    if lic.conflicts and not lic.override:
        log.warning("license conflict (the publish gate will fail): %s", "; ".join(lic.conflicts))
    return summary


def _body(ctx: StageContext) -> None:
    p = ctx.params.paths
    for key in ("model", "dataset"):
        ctx.add_input(ctx.path(key), log_dataset=key == "dataset")
    out = ctx.path("cards")
    with atomic_dir(out) as tmp:
        summary = run(ctx.params, ctx.root, tmp)
    ctx.add_output(out)
    ctx.record.extra["release"] = summary["release"]
    ctx.record.extra["license"] = summary["license"]["release"]
    ctx.run.set_tags({"release.version": summary["release"]["version"], "release.license": summary["license"]["release"]})
    ctx.run.log_artifact(out / MODEL_DIR / "README.md", artifact_path="cards/model")
    ctx.run.log_artifact(out / DATASET_DIR / "README.md", artifact_path="cards/dataset")
    log.info("cards written to %s (model repo %s, dataset repo %s)", p.cards, summary["release"]["model_repo"],
             summary["release"]["dataset_repo"])


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
