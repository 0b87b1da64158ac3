"""Iterative on-policy DPO: where each round's files live, and the params a round's stage sees.

Round 1 is the pipeline's ordinary stages and paths, untouched. A later round `rk` (k >= 2) runs the same
stage modules as DVC `foreach` stages `<stage>_round@rk` (`python -m pipeline.stages.<stage> --round rk`);
`wrap` hands the stage's own body a view of params whose paths point into the round's folders, so one
body serves every round and round k is round 1's code with other inputs:

    generate   samples with round k-1's merged model (rounds.later.rk.model_in), same `generate` params
    rate .. build   the same rules on the round's samples; build holds out round 1's test prompts
                    (so no round trains on a prompt the held-out pairs ask) and, with rounds.data
                    accumulate, adds the previous round's train pairs
    train      from round k-1's policy (rounds.start_from previous: it is also the DPO reference) or
               from the base model (start_from base)
    evaluate   round k's policy against the base model, on round 1's held-out pairs and the same prompts
    report     (stage rounds_report@rk) the table of rounds 1..k, round k against round k-1, the pick

Layout of round rk: `<rounds.dir>/rk/` holds its data, model, caches and metrics; its reports and
plots go to `<paths.reports>/rounds/rk/` and `<paths.plots>/rounds/rk/`, which the card and publish
stages already depend on (as folders), so a later round reruns them without changing their dvc.yaml
entries; lineage records are `<paths.lineage>/<stage>.rk.json`.

Why `foreach` over `rounds.later` rather than a generated dvc.yaml or a loop in one stage: DVC hashes
each round's stages on their own, so `dvc repro` reruns only a round whose inputs changed, `dvc dag`
shows the chain (round k's generate depends on round k-1's model folder), every output is cached and
pushed like round 1's, and dvc.yaml stays one hand-written file that reviews like the rest. DVC cannot
count, so each entry of `later` names the folders it reads from the round before; `later_problems`
checks them against this layout, and `openrelease rounds --count N` prints the block to paste.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIRST = "r1"
# paths keys each later round writes into its own folder (<rounds.dir>/<round>/<name>)
OWN = {"generations": "generations.jsonl", "rated": "rated.jsonl", "ingested_sources": "ingested_sources",
       "ingested": "ingested", "validated": "validated", "dataset": "dataset", "checkpoints": "checkpoints",
       "ref_logps": "ref_logps", "model": "model", "eval_dir": "eval", "eval_cache": "eval_cache",
       "metrics": "metrics", "runs": "runs"}
SUMMARY = "summary.json"
# The rounds keys a later round's stages read besides their own, as dvc.yaml lists them: the round's own
# entry only, so a change to round 3's entry reruns round 3 and not round 2.
ROUND_READS = ["rounds.start_from", "rounds.data", "rounds.dir", "rounds.later.${key}"]


def reads(stage_reads: list[str], name: str) -> list[str]:
    """A round stage's params keys for round `name` (what its lineage record lists)."""
    return [*stage_reads, *(k.replace("${key}", name) for k in ROUND_READS)]


def names(params: Any) -> list[str]:
    """Every round's name, r1 first."""
    return [FIRST, *params.rounds.later]


def index(name: str) -> int:
    return int(name[1:])


def previous(name: str) -> str:
    return f"r{index(name) - 1}"


def folder(params: Any, name: str) -> str:
    return f"{params.rounds.dir}/{name}"


def reports_dir(params: Any, name: str) -> str:
    return f"{params.paths.reports}/rounds/{name}"


def plots_dir(params: Any, name: str) -> str:
    return f"{params.paths.plots}/rounds/{name}"


def paths_of(params: Any, name: str) -> dict[str, str]:
    """The paths keys of round `name` (r1: params.paths as they are)."""
    p = params.paths.model_dump()
    if name == FIRST:
        return p
    return {**p, **{k: f"{folder(params, name)}/{v}" for k, v in OWN.items()},
            "reports": reports_dir(params, name), "plots": plots_dir(params, name)}


def summary_of(params: Any, name: str) -> str:
    """Round 1's evaluation metrics; a later round's rounds summary (the table of every round so far)."""
    if name == FIRST:
        return f"{params.paths.metrics}/eval.json"
    return f"{reports_dir(params, name)}/{SUMMARY}"


def expected_later(params: Any, name: str) -> dict[str, Any]:
    prev = paths_of(params, previous(name))
    return {"model_in": prev["model"], "dataset_in": prev["dataset"], "eval_in": prev["eval_dir"],
            "summary_in": summary_of(params, previous(name))}


def later_problems(params: Any) -> list[str]:
    """Entries of rounds.later whose folders are not the previous round's (DVC would chain the wrong files)."""
    out = []
    for name, entry in params.rounds.later.items():
        want = expected_later(params, name)
        for key, value in want.items():
            if getattr(entry, key) != value:
                out.append(f"rounds.later.{name}.{key} = {getattr(entry, key)!r}: the previous round's is {value!r}")
    return out


def later_block(params: Any, count: int) -> dict[str, dict[str, str]]:
    """The `rounds.later` mapping for `count` rounds (what `openrelease rounds --count N` prints)."""
    have = params.rounds.later
    return {f"r{k}": {**expected_later(params, f"r{k}"),
                      "prompts": have[f"r{k}"].prompts if f"r{k}" in have else params.paths.train_prompts}
            for k in range(2, count + 1)}


def prompts_of(params: Any, name: str) -> str:
    return params.paths.train_prompts if name == FIRST else params.rounds.later[name].prompts


def on_policy_sources(params: Any) -> list[Any]:
    """The data sources that read round 1's rated rows (paths.rated): a later round swaps in its own."""
    return [s for s in params.data.sources if s.path == params.paths.rated]


def view(params: Any, name: str, stage: str) -> Any:
    """Params as stage `stage` of round `name` must see them (not validated again: the paths differ from
    the ones `later` was checked against on purpose)."""
    from pipeline.core.errors import ParamsError

    if name not in params.rounds.later:
        raise ParamsError(f"--round {name}: not a round after the first in rounds.later ({list(params.rounds.later)})")
    paths = paths_of(params, name)
    entry = params.rounds.later[name]
    update: dict[str, Any] = {**paths, "train_prompts": prompts_of(params, name), "base_model": params.paths.base_model}
    if stage == "generate" or (stage == "train" and params.rounds.start_from == "previous"):
        # the model that samples; in train, the one trained from and the DPO reference (LoRA adapters off)
        update["base_model"] = entry.model_in
    elif stage == "evaluate":
        update["dataset"] = params.paths.dataset  # round 1's held-out pairs: every round scored on the same
    new_paths = params.paths.model_copy(update=update)
    sources = on_policy_sources(params)
    if not sources:
        raise ParamsError("rounds.count > 1 needs an on-policy source in data.sources (path: *rated): "
                          "a later round's data are its own policy's rated samples")
    data = params.data.model_copy(update={"sources": [s.model_copy(update={"path": paths["rated"]}) for s in sources]})
    return params.model_copy(update={"paths": new_paths, "data": data})


def template_record_dir(ctx: Any) -> Path:
    """The folder whose SOURCE.json holds the chat template record a stage checks its tokenizer against:
    the base model's, also in a later round whose model folder is the previous round's policy."""
    rnd = ctx.record.extra.get("round")
    return ctx.root / rnd["template_record"] if rnd else ctx.path("base_model")


def generator_label(ctx: Any) -> str | None:
    """The `generator` a later round's samples carry ("<base model name> + DPO r1": the policy round 1
    trained, named by its sha256 in the lineage record); None in round 1 (the model folder names itself)."""
    import json

    rnd = ctx.record.extra.get("round")
    if not rnd:
        return None
    source = ctx.root / rnd["template_record"] / "SOURCE.json"
    name = json.loads(source.read_text(encoding="utf-8")).get("name") if source.is_file() else None
    return f"{name or Path(rnd['template_record']).name} + DPO {rnd['previous']}"


def round_arg(argv: list[str] | None = None) -> str | None:
    """NAME of `--round NAME` on the command line, else None."""
    argv = sys.argv[1:] if argv is None else argv
    if "--round" in argv:
        i = argv.index("--round")
        if i + 1 < len(argv):
            return argv[i + 1]
    return None


def wrap(name: str, stage: str, body: Callable[[Any], None]) -> Callable[[Any], None]:
    """`body` run for round `name`: ctx.params becomes the round's view; the lineage record says which
    round it is, what it read from the round before, and the code of the stage module it ran."""
    def run(ctx: Any) -> None:
        from pipeline.core.imports import code_sha256
        from pipeline.core.lineage import sha256_json

        original = ctx.params
        ctx.params = view(original, name, stage)
        # the record lists the values the body used: the round's paths and sources (paths.base_model of
        # generate.r2 is the model that sampled), not the round-1 values params.yaml holds under those keys
        ctx.record.params = {k: ctx.params.section_dump(k) for k in ctx.record.params}
        ctx.record.params_digest = sha256_json(ctx.record.params)
        module = f"pipeline.stages.{stage}"
        ctx.record.code = {"module": module, "sha256": code_sha256(module)}
        entry = original.rounds.later[name]
        info: dict[str, Any] = {"name": name, "index": index(name), "previous": previous(name),
                                "start_from": original.rounds.start_from, "data": original.rounds.data,
                                "model_in": entry.model_in, "dataset_in": entry.dataset_in, "eval_in": entry.eval_in,
                                "summary_in": entry.summary_in, "first_dataset": original.paths.dataset,
                                "template_record": original.paths.base_model,
                                "paths": {k: getattr(ctx.params.paths, k) for k in
                                          ("base_model", "train_prompts", "dataset", "model", "eval_dir")}}
        ctx.record.extra["round"] = info
        body(ctx)
        # the previous round's model by sha256, from the inputs the body recorded (hashed once)
        for art in ctx.record.inputs:
            if art.path == entry.model_in:
                info["previous_model"] = {"round": previous(name), "path": art.path, "sha256": art.sha256}
        ctx.record.extra["round"] = info

    return run


def read_summary(root: Path, params: Any) -> dict[str, Any] | None:
    """The last round's rounds summary (None with one round or before it is made)."""
    from pipeline.core.io import read_json

    if not params.rounds.later:
        return None
    f = Path(root) / summary_of(params, list(params.rounds.later)[-1])
    return read_json(f) if f.is_file() else None


def with_count(text: str, params: Any, count: int) -> str:
    """params.yaml text with rounds.count = `count` and rounds.later the block the layout needs (comments
    and every other line kept); `openrelease rounds --count N --write`."""
    import re

    from pipeline.core.errors import ParamsError

    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, ln in enumerate(lines) if re.match(r"^rounds:", ln))
    except StopIteration:
        raise ParamsError("params.yaml has no `rounds:` section to set") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith(" ")), len(lines))
    section = lines[start:end]
    out, i, seen = [], 0, set()
    while i < len(section):
        ln = section[i]
        if m := re.match(r"^  count:\s*\S+(\s*#.*)?$", ln.rstrip("\n")):
            out.append(f"  count: {count}{(m.group(1) or '')}\n")
            seen.add("count")
        elif m := re.match(r"^  later:[^#]*(#.*)?$", ln.rstrip("\n")):
            comment = m.group(1) or ""
            i += 1
            while i < len(section) and section[i].startswith("    "):
                i += 1  # the old entries
            block = later_block(params, count)
            head = "  later: {}" if not block else "  later:"
            out.append(f"{head.ljust(37)}{comment}".rstrip() + "\n")  # comments start at column 37 in params.yaml
            if block:
                for name, entry in block.items():
                    out.append(f"    {name}: {{{', '.join(f'{k}: {v}' for k, v in entry.items())}}}\n")
            seen.add("later")
            continue
        else:
            out.append(ln)
        i += 1
    if seen != {"count", "later"}:
        raise ParamsError(f"params.yaml: rounds needs `count:` and `later:` lines to set (found {sorted(seen)})")
    return "".join(lines[:start] + out + lines[end:])


# -- the release: the round it ships (rounds.publish, applied by rounds_report) ---------------------------
RELEASED = ("model", "dataset", "metrics", "eval_dir")  # paths keys a release reads from the shipped round


def published(root: Path, params: Any) -> str | None:
    """The round the last rounds summary says to ship; None with one round (or before the summary)."""
    summary = read_summary(root, params)
    return summary["published"] if summary else None


def release_view(params: Any, root: Path) -> Any:
    """Params as the card and the release bundle must see them: paths.model, dataset, metrics and eval_dir
    of the round that ships (unchanged when that is round 1 or there is one round)."""
    name = published(root, params)
    if name in (None, FIRST):
        return params
    p = paths_of(params, name)
    return params.model_copy(update={"paths": params.paths.model_copy(update={k: p[k] for k in RELEASED})})


def release_lineage(lineage: dict[str, Any], params: Any) -> dict[str, Any]:
    """Lineage records keyed for a release of a later round: the shipped round's records under the bare
    stage names (`train`: the stage that wrote the released weights, what the audit and gates look up), every
    other round's under `<stage>.<round>` (round 1's as `train.r1`, ...). Unchanged for round 1."""
    name = next((n for n in params.rounds.later if params.paths.model == paths_of(params, n)["model"]), None)
    if name is None:
        return lineage
    staged = {s.rsplit(".", 1)[0] for s in lineage if s.endswith(f".{name}")}
    out = {}
    for key, rec in lineage.items():
        if key.endswith(f".{name}"):
            out[key.rsplit(".", 1)[0]] = rec
        elif key in staged:
            out[f"{key}.{FIRST}"] = rec
        else:
            out[key] = rec
    return out
