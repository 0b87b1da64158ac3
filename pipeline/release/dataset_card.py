"""The dataset card's computed sections: where the data came from, every config, each split's rule.

Every number is read from the run's outputs (metrics/generate.json, metrics/rate.json,
metrics/data.json, the lineage records' params, the Parquet files); an absent one prints as n/a,
never a guess. The same facts feed the Croissant file's RAI fields (pipeline.release.croissant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.release.dataset_repo import EVAL_ANSWERS, UNIT_ROLES
from pipeline.release.inputs import ReleaseInputs

NA = "n/a"
ONE_PER_PROMPT = ("best_vs_worst", "best_vs_worst_length_matched", "best_vs_random")
# What each binarization method pairs (pipeline/data/binarization.py, stated for readers of the card).
METHODS = {
    "best_vs_worst": "one pair per prompt: its highest-rated sample against its lowest-rated one",
    "best_vs_worst_length_matched": "one pair per prompt: its highest-rated sample against, among the samples "
                                    "sharing the lowest rating, the one closest in length to it (so a pair differs "
                                    "in what was followed, not in how long it ran)",
    "best_vs_random": "one pair per prompt: its highest-rated sample against a random lower-rated one (seeded)",
    "all_pairs_above_margin": "every pair of a prompt's samples whose ratings differ by at least `build.min_margin`: "
                              "up to n(n-1)/2 pairs from n samples",
}
PROMPT_SETS = {
    "train_prompts": "the prompts the on-policy samples answer (they make the pairs of both splits)",
    "dev_prompts": "the dev prompts: selection reads their results (sweeps, thresholds), never reported",
    "test_prompts": "the held-out test prompts: the reported verifiable pass rate and the model-index",
    "ifeval_prompts": "a subset of Google's IFEval prompts (IFEval's reference accuracies)",
    "general_prompts": "everyday prompts the judged win rate is measured on",
}


def _n(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return NA
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _rows(path: Path) -> int | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError):  # a count for the card; the bundle reads the file again and says why
        return None


def on_policy_sources(inp: ReleaseInputs) -> tuple[list[dict], list[dict]]:
    """(sources read from the `rate` stage's output, every other source)."""
    rated = str(inp.params.paths.rated)
    on, other = [], []
    for s in inp.data_sources():
        (on if inp.source_path(s) == rated else other).append(s)
    return on, other


def facts(inp: ReleaseInputs) -> dict[str, Any]:
    """The numbers the origin section and the Croissant RAI fields quote."""
    gp = inp.stage_params("generate", "generate")
    rp = inp.stage_params("rate", "rate")
    return {"generator": inp.params.base_model.name, "gen": gp, "rate": rp,
            "gen_m": inp.stage_metrics("generate") or {}, "rate_m": inp.stage_metrics("rate") or {},
            "data_m": inp.metrics.get("data") or {}, "build": inp.stage_params("build", "build"),
            "validity": inp.stage_params("rate", "validity")}


def origin(inp: ReleaseInputs) -> str:
    on, other = on_policy_sources(inp)
    f = facts(inp)
    gp, gm, rm, rp = f["gen"], f["gen_m"], f["rate_m"], f["rate"]
    lines = []
    if on:
        names = ", ".join(f"`{s.get('name')}`" for s in on)
        unfinished = rp.get("unfinished")
        cut_rule = {"invalid": "is credited with nothing, as evaluation fails a cut answer",
                    "fail": "is credited with no instruction that needs the whole answer",
                    "exclude": "is dropped"}.get(unfinished, f"follows `rate.unfinished: {unfinished}`")
        lines += [
            f"**On-policy samples ({names}).** The answers are the base model's own: **{f['generator']}** "
            f"answered each of the {_n(gm.get('prompts'))} prompts of `paths.train_prompts` (the `train_prompts` "
            f"config) {_n(gp.get('samples_per_prompt'))} times, sampling at temperature {_n(gp.get('temperature'))}, "
            f"top-p {_n(gp.get('top_p'))}, at most {_n(gp.get('max_new_tokens'))} new tokens, seed "
            f"{_n(gp.get('seed'))} (stage `generate`): {_n(gm.get('completions'))} samples, of which "
            f"{_n(gm.get('truncated_completions'))} stopped at the token limit.",
            "",
            "**How they were rated (stage `rate`).** By rule, not by people or a judge model. Each sample was checked "
            "against its prompt's verifiable instructions with IFEval's strict checkers "
            "(`pipeline/constraints/`); its rating is 1 + round_half_up(4 x the share of instructions "
            "followed), 1 to 5. A degenerate sample (the `validity` rules: empty, too short, looping, a "
            "repeated sentence, copying the prompt, off-topic, one answer reused across prompts) is credited "
            f"with nothing ({_n(rm.get('degenerate_completions'))} samples); a sample cut at the token limit "
            f"{cut_rule} (`rate.unfinished: {unfinished}`). {_n(rm.get('contrastive_prompts'))} of "
            f"{_n(rm.get('prompts'))} prompts got samples rated differently, the only ones that can make a pair.",
            "",
            "`rate` writes its rows in the layout of UltraFeedback (`openbmb/UltraFeedback`) so that one reader "
            "serves both, with the rating in the `instruction_following` aspect and the other aspects "
            "\"N/A\". **No UltraFeedback data is in this dataset** unless a source below says so.",
        ]
    if other:
        lines += ["", "**Other sources**, read as their formats define:", "", _other_table(inp, other)]
    else:
        lines += ["", "**Other sources:** none. Every pair comes from the on-policy samples above."]
    return "\n".join(lines)


def _other_table(inp: ReleaseInputs, sources: list[dict]) -> str:
    from pipeline.release.cards import _table

    arts = {a.get("path"): a for a in (inp.record("ingest") or {}).get("inputs", [])}
    rows = []
    for s in sources:
        path = inp.source_path(s)
        art = arts.get(path)
        rev = path.rsplit("@", 1)[1] if path.startswith("hf://") and "@" in path else (
            f"sha256 `{art['sha256'][:12]}`" if art and art.get("sha256") else NA)
        rows.append([str(s.get("name")), str(s.get("format")), f"`{path}`", rev, str(s.get("license") or NA),
                     _n(art.get("rows")) if art else NA])
    return _table(["source", "format", "path", "revision", "license", "rows read"], rows)


def splits_section(inp: ReleaseInputs) -> str:
    """Each pair split's binarization rule and why the sizes differ, from metrics/data.json."""
    from pipeline.release.cards import _table

    f = facts(inp)
    b, m = f["build"], f["data_m"]
    rules = {"train": b.get("binarize"), "test": b.get("test_binarize") or b.get("binarize")}
    rows = []
    for split, n in inp.splits.items():
        rule = rules.get(split)
        prompts = m.get(f"prompts_{split}")
        per = f"{n / prompts:.2f}" if isinstance(prompts, int) and prompts else NA
        rows.append([split, str(n), _n(prompts), per, f"`{rule}`: {METHODS.get(rule, NA)}" if rule else NA])
    lines = [_table(["split", "pairs", "prompts", "pairs per prompt", "binarization rule"], rows), ""]
    frac = b.get("test_fraction")
    lines.append(
        "Both splits come from the same on-policy prompts (`train_prompts`), never from the evaluation prompt "
        f"sets. `build` pairs the {_n(m.get('groups_binarized'))} prompt groups it keeps; "
        f"{_n(m.get('filtered.no_pair'))} make no pair (all their samples tied: `binarize.tie` "
        f"{_n(m.get('binarize.tie'))} candidate pairs dropped). Of the prompts that pair, round({_n(frac)} x "
        f"paired prompts) = {_n(m.get('prompts_test'))} are held out as `test` (those with the lowest seeded "
        f"hash, seed {_n(b.get('seed'))}), {_n(m.get('prompts_train'))} train.")
    if rules["train"] != rules["test"]:
        lines.append("")
        lines.append(
            "**Why the sizes differ:** each split has its own rule (`build.binarize` for train, "
            "`build.test_binarize` for test). "
            + ("Train takes one pair per prompt, so DPO sees each prompt once. " if rules["train"] in ONE_PER_PROMPT else "")
            + ("Test takes every strict ranking of a held-out prompt's samples, so the held-out preference accuracy "
               "rests on more comparisons (its interval resamples prompts, not pairs). " if rules["test"] == "all_pairs_above_margin" else "")
            + f"Here {_n(m.get('prompts_test'))} test prompts give {_n(inp.splits.get('test'))} pairs and "
            f"{_n(m.get('prompts_train'))} train prompts give {_n(inp.splits.get('train'))}.")
    return "\n".join(lines)


def cut_section(inp: ReleaseInputs) -> str:
    m = facts(inp)["data_m"]
    rows = [f"- `{s}`: chosen cut {_n(m.get(f'cut.chosen_{s}'))}, rejected cut {_n(m.get(f'cut.rejected_{s}'))}, "
            f"unknown {_n(m.get(f'cut.unknown_{s}'))} of {n} pairs" for s, n in inp.splits.items()]
    return "\n".join([
        "`chosen_cut` / `rejected_cut`: whether that reply stopped at the generator's `max_new_tokens` "
        "(true: cut mid-answer; false: the model ended it). They carry the generator's own flag through "
        "`rate` and `build`. A pair from an external source has null in both: no external format records "
        "whether a reply was cut, and guessing it from the text would be a rule, not a fact.", "", *rows])


def configs_section(inp: ReleaseInputs, configs: list[dict[str, Any]]) -> str:
    """One row per config and split: its file, rows and what it is."""
    from pipeline.release.cards import _table

    sets = inp.eval_prompt_sets()
    rows = []
    for c in configs:
        name = c["config_name"]
        for df in c["data_files"]:
            split, path = df["split"], df["path"]
            if name == "default":
                n, what = inp.splits.get(split), ("the DPO pairs, TRL's conversational format (prompt, chosen, "
                                                  "rejected) with scores, cut flags and provenance ids")
            elif name in inp.side_tables:
                n, what = _rows(inp.side_tables[name]), ("per pair: source row, license, generators, every rating "
                                                         "behind the choice, rule, seed, split, raw-record sha256")
            elif name == EVAL_ANSWERS:
                n = _rows(inp.eval_tables[split])
                n = 2 * n if n is not None else None
                what = f"both models' answers and per-instruction verdicts (one row per prompt and model) on {UNIT_ROLES.get(split, split)}"
            else:
                n = sum(_line_count(x) for x in sets.get(name, [])) or None
                what = PROMPT_SETS.get(name, "an evaluation prompt set") + (
                    f"; byte-exact copies in `eval/{name}/`" if name in sets else "")
            rows.append([f"`{name}`", split, f"`{path}`", _n(n), what])
    return _table(["config", "split", "file", "rows", "what it is"], rows)


def _line_count(path: Path) -> int:
    if path.suffix == ".parquet":
        return _rows(path) or 0
    if path.suffix == ".json":
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return 0
        return len(data) if isinstance(data, list) else 0
    return sum(1 for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())


def eval_answers_section(inp: ReleaseInputs, repo: str, version: str) -> str:
    if not inp.eval_tables:
        return "The evaluate stage's per-prompt tables were not found, so this release has no `eval_answers` config."
    return "\n".join([
        f"Config `{EVAL_ANSWERS}` holds, for every prompt of {', '.join(f'`{u}`' for u in inp.eval_tables)}, the "
        "greedy answer of the base model (`model: base`) and of the tuned model (`model: policy`) with the verdicts "
        "the release's numbers come from: `follow_strict` (IFEval strict, one per instruction in "
        "`instruction_id_list` order), `strict`, `valid`, `degenerate` (the validity rules broken), `passed` "
        "(strict and valid: the headline) and `finished` (false: cut at evaluate's max_new_tokens). Rescore them:",
        "", "```python", "import datasets",
        f'ev = datasets.load_dataset("{repo}", "{EVAL_ANSWERS}", split="test", revision="{version}")',
        'ev.filter(lambda r: r["model"] == "policy").select_columns(["prompt", "response", "finished"]) \\',
        '  .to_json("policy.jsonl")', "```", "",
        "In a clone of the code at the release tag (for params.yaml's validity rules), with this dataset repo "
        "downloaded to `DATA/`:", "", "```bash",
        f"openrelease score --responses policy.jsonl --prompts DATA/eval/test_prompts/{_file(inp, 'test_prompts')} "
        "--out rescored   # the headline's rules: validity, then IFEval strict",
        "```", *([
            "", "The `ifeval` split's answers, in IFEval's own scorer (`openrelease ifeval --input "
            f"DATA/eval/ifeval_prompts/{_file(inp, 'ifeval_prompts')} --responses ifeval.jsonl --out DIR`), give "
            "IFEval's reference accuracies."] if "ifeval" in inp.eval_tables else [])])


def _file(inp: ReleaseInputs, name: str) -> str:
    files = inp.eval_prompt_sets().get(name) or []
    return files[0].name if len(files) == 1 else "<file>"
