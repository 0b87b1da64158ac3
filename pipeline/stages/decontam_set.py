"""Stages `decontam_set@<i>` and `decontam_own`: make each decontamination set a DVC dependency of `build`.

Reads:  one entry of params `data.decontaminate_against` (`decontam_set NAME`), or the project's own
        evaluation prompt files (`decontam_set --own`: `paths.test_prompts`, `dev_prompts`,
        `ifeval_prompts`, `general_prompts`, always decontaminated against).
Writes: `paths.decontam_sets/<name>.json`: the set's name, path and sha256 (`_own.json`: one such
        record per own set, under `sets`).
Run:    `dvc repro build` runs these first.

DVC's foreach cannot add deps to another stage, so each set gets this small stage with the set's file
as its dep; `build` depends on the folder of records and refuses a set file whose sha256 differs from
its record. Editing a set file therefore shows in `dvc status` and reruns `build`. The own set's stage
is not a foreach, so the folder exists even when `data.decontaminate_against` is empty.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.core.errors import ParamsError
from pipeline.core.imports import stage_code
from pipeline.core.io import atomic_write_json
from pipeline.core.lineage import sha256_file
from pipeline.core.stage import StageContext, stage_main

STAGE = "decontam_set"
READS = ["data.decontaminate_against", "paths.decontam_sets"]
OWN_READS = ["paths.test_prompts", "paths.dev_prompts", "paths.ifeval_prompts", "paths.general_prompts",
             "paths.decontam_sets"]
DVC_STAGES = {STAGE: READS, "decontam_own": OWN_READS}  # dvc.yaml stage -> the params it reads
OWN = "_own"  # not a valid set name (they start with a letter or digit), so it never clashes


def record_file(decontam_dir: Path, name: str) -> Path:
    return decontam_dir / f"{name}.json"


def run(name: str, path: str, root: Path, out: Path) -> dict[str, Any]:
    """Record the set file's sha256 in `out`."""
    from pipeline.core.errors import SourceError

    file = Path(path) if Path(path).is_absolute() else root / path
    if not file.is_file():
        raise SourceError(f"decontamination set {name}: {path} does not exist")
    record = {"name": name, "path": path, "sha256": sha256_file(file)}
    atomic_write_json(out, record)
    return record


def _body_for(name: str):
    def body(ctx: StageContext) -> None:
        # the record is named decontam_set.<name>, which names no module: its code is this module's
        ctx.record.code = stage_code("pipeline.stages.decontam_set")
        if name == OWN:
            out = record_file(ctx.path("decontam_sets"), name)
            sets = []
            for key, path in ctx.params.paths.own_eval_sets().items():
                file = Path(path) if Path(path).is_absolute() else ctx.root / path
                if not file.is_file():
                    from pipeline.core.errors import SourceError

                    raise SourceError(f"paths.{key}: {path} does not exist")
                sets.append({"name": key, "path": path, "sha256": sha256_file(file)})
                ctx.add_input(file, name=f"eval:{key}", log_dataset=False)
            atomic_write_json(out, {"name": name, "sets": sets})
            ctx.add_output(out)
            return
        else:
            sets = {s.name: s for s in ctx.params.data.decontaminate_against}
            if name not in sets:
                raise ParamsError(f"data.decontaminate_against: no set named {name!r} (have {sorted(sets)})")
            path = sets[name].path
        out = record_file(ctx.path("decontam_sets"), name)
        run(name, path, ctx.root, out)
        ctx.add_input(Path(path) if Path(path).is_absolute() else ctx.root / path, name=f"eval:{name}",
                      log_dataset=False)
        ctx.add_output(out)

    return body


def main() -> None:
    if sys.argv[1:] == ["--own"]:
        stage_main(f"{STAGE}.{OWN}", OWN_READS, _body_for(OWN))
    elif len(sys.argv) == 2:
        stage_main(f"{STAGE}.{sys.argv[1]}", READS, _body_for(sys.argv[1]))
    else:
        print("usage: python -m pipeline.stages.decontam_set NAME | --own", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
