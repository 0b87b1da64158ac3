"""Stage `build`: validated rows -> the DPO dataset (TRL conversational preference format).

Reads:  `paths.validated/rows.parquet` and `summary.json`; evaluation prompts to decontaminate against
        (the project's own, always: `paths.test_prompts`, `dev_prompts`, `ifeval_prompts` and
        `general_prompts`; plus `data.decontaminate_against`); `paths.train_prompts`, checked disjoint
        from dev and test (the three prompt roles; an overlap stops the build); the chat template of
        `paths.base_model` (token lengths); params `build`, `data`, `validate.pairs`,
        `validate.max_length`, `validate.max_quarantine_fraction`.
Writes: `paths.dataset/` train.parquet and test.parquet (columns: pipeline.data.pair_checks.SPLIT_COLUMNS:
        the contract columns and `chosen_cut` / `rejected_cut`, whether a reply was cut at max_new_tokens),
        provenance.parquet (per pair: source row, license, generators, the ratings behind the choice,
        rule, seed, split, and `record_sha256`: the raw records it derives from, see pipeline.data.takedowns), filtered.jsonl (every row that made no pair, with the filter's name),
        quarantine.jsonl (pairs set aside by the pairs suite); `paths.reports/decontamination.json`;
        `paths.reports/pairs_validation/` (report.json + GX Data Docs); `paths.metrics/data.json`.
Run:    `dvc repro build` (or `python -m pipeline.stages.build`).

Steps, in order, each counted in metrics/data.json: decontamination (exact match or word n-gram
overlap of any user turn with an eval prompt), source weights, exact duplicates (normalised prompt
hash), near duplicates (MinHash LSH), binarization (ties and margins below min_margin dropped),
the pairs suite (GX), the split (round(test_fraction x paired prompts) with the lowest hash of seed and prompt hash). Rows are processed as
memory-mapped Arrow (`datasets`) in batched maps. Same inputs and seed give byte-identical files.

metrics/data.json (flat): excluded.takedown, excluded.takedown.<source> (raw records ingest dropped for
data/takedowns.yaml, not part of `read`), read, read.<source>, quarantined, quarantined.<rule>, validated (rows kept by
validate); filtered.decontaminated, filtered.decontaminated.<eval set>, filtered.weight,
filtered.exact_duplicate, filtered.near_duplicate, filtered.no_pair (prompt groups); groups_binarized;
binarize.too_few_rated (groups), binarize.tie and binarize.below_margin (candidate pairs dropped),
binarize.unrated (completions without any rating); cut.chosen_<split> and cut.rejected_<split> (pairs
whose chosen / rejected reply was cut at max_new_tokens), cut.unknown_<split> (pairs from a source that does
not say); pairs_built, pairs_quarantined, pairs_train,
pairs_test, prompts_train, prompts_test; rows_unaccounted (always 0: the build stops otherwise).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError, SourceError
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, write_parquet
from pipeline.core.params import BuildParams, DataParams, EvalPromptSet, ValidateParams
from pipeline.core.rounds import ROUND_READS
from pipeline.core.stage import StageContext, stage_main
from pipeline.data import dedup, pair_checks
from pipeline.data.binarization import binarize_batch, held_out_prompts, pair_features
from pipeline.data.decontamination import load_index, role_overlaps
from pipeline.data.filtering import column, filter_rows, prepare
from pipeline.data.pair_checks import check_pairs
from pipeline.data.validation import stepper

STAGE = "build"
READS = ["build", "data", "validate.pairs", "validate.max_length", "validate.max_quarantine_fraction",
         "evaluate.general.field", "paths.validated", "paths.train_prompts", "paths.test_prompts", "paths.dev_prompts",
         "paths.ifeval_prompts", "paths.general_prompts", "paths.decontam_sets", "paths.base_model", "paths.dataset",
         "paths.reports", "paths.metrics"]
PROVENANCE = ("id", "source", "source_row", "license", "generator_chosen", "generator_rejected",
              "ratings_chosen", "ratings_rejected", "rule", "seed", "split", "prompt_hash", "record_sha256")
PAIRS_REPORT_DIR, DECONTAM_FILE, METRICS_FILE = "pairs_validation", "decontamination.json", "data.json"

log = logging.getLogger(__name__)


def run(validated_dir: Path, data: DataParams, p: BuildParams, v: ValidateParams, eval_sets: list[EvalPromptSet],
        tokenizer_dir: Path | None, out_dir: Path, reports_dir: Path, root: Path,
        held_out: set[str] | None = None) -> dict[str, Any]:
    """Build the dataset into `out_dir` and the reports into `reports_dir`; return the flat counts.
    `held_out` (prompt hashes) replaces the seeded split: a later DPO round holds out round 1's test prompts.

    The pairs suite's report (`reports_dir/pairs_validation/`) is written before a failing rule stops the
    build, so its Data Docs show what failed."""
    from datasets import Dataset, disable_caching

    disable_caching()
    step = stepper("build")
    summary = read_json(validated_dir / "summary.json")
    index, decon_info = load_index(eval_sets, p.decontam_ngram, p.decontam_min_words, root)
    step(f"indexed {sum(index.sizes.values())} eval texts")
    perms = dedup.permutations(p.near_dup_num_perm, p.seed) if p.near_dup_threshold is not None else None
    with tempfile.TemporaryDirectory(prefix="openrelease-build-") as scratch:
        rows = Dataset.from_parquet(str(validated_dir / "rows.parquet"), cache_dir=scratch)
        step(f"loaded {len(rows)} rows as memory-mapped Arrow")
        hasher = dedup.WordHasher()
        prep = rows.with_format("arrow").map(
                        prepare, batched=True, batch_size=p.batch_size, remove_columns=rows.column_names,
                        new_fingerprint="prepare",
                        fn_kwargs={"index": index, "hasher": hasher, "p": p, "perms": perms},
                        desc="Hashing prompts (dedup, decontamination)")
        step("hashed prompts")
        kept, filtered, counts = filter_rows(prep, rows, data, p, decon_info)
        step(f"filtered: {len(kept)} prompt groups kept, {len(filtered)} removed")
        no_pair: list[dict] = []
        bin_counts: Counter = Counter()
        features = pair_features()
        kept_hashes = column(prep, "prompt_hash")
        kept_hashes = [kept_hashes[i] for i in kept]
        groups = rows.select(kept).with_format("arrow")

        def binarize(params: BuildParams, test: set[str], no_pair: list, counts: Counter, fingerprint: str):
            return groups.map(binarize_batch, batched=True, batch_size=p.batch_size, with_indices=True,
                              remove_columns=rows.column_names, features=features, new_fingerprint=fingerprint,
                              fn_kwargs={"p": params, "hashes": kept_hashes, "test": test, "features": features,
                                         "no_pair": no_pair, "counts": counts},
                              desc=f"Binarizing ({params.binarize})").with_format(None)

        # The split is drawn among the prompts that make a pair (whether a group makes one does not depend
        # on the method), so test_fraction is the share of paired prompts, not of ties.
        paired = set(binarize(p.model_copy(update={"test_binarize": None}), set(), [], Counter(), "pairable")["prompt_hash"])
        test = held_out_prompts(sorted(paired), p.seed, p.test_fraction) if held_out is None else held_out
        pairs = binarize(p, test, no_pair, bin_counts, "binarize")
        step(f"binarized: {len(pairs)} pairs")
        counter = pair_checks.TokenCounter(tokenizer_dir, v.max_length) if tokenizer_dir else None
        pairs_report = reports_dir / PAIRS_REPORT_DIR  # kept when the suite fails, so not an atomic dir
        shutil.rmtree(pairs_report, ignore_errors=True)
        pairs_report.mkdir(parents=True)
        shown = pairs_report / "report.json"
        shown = shown.relative_to(root) if shown.is_relative_to(root) else shown
        outcome, frame, describe = check_pairs(pairs, counter, v, pairs_report, str(shown), p.batch_size)
        step("pairs suite done")
        if outcome.error is not None:
            raise outcome.error
        q = np.zeros(len(frame), dtype=bool)
        q[list(outcome.quarantined)] = True
        split = np.array(frame["split"], dtype=object) if len(frame) else np.zeros(0, dtype=object)
        table = pairs.with_format("arrow")[:]  # a zero-copy slice of the memory-mapped pairs
        for name in ("train", "test"):
            write_parquet(table, np.flatnonzero((split == name) & ~q), pair_checks.SPLIT_COLUMNS,
                          out_dir / f"{name}.parquet")
        import pyarrow as pa

        over = np.zeros(len(frame), dtype=bool)
        over[outcome.truncated] = True  # kept for TRL to truncate (token_length: truncate)
        table = table.append_column("truncated", pa.array(over)).append_column(
            "tokens_max", pa.array(np.asarray(frame["tokens_max"], dtype=np.int64) if len(frame) else [], pa.int64()))
        write_parquet(table, np.flatnonzero(~q), (*PROVENANCE, "truncated", "tokens_max"), out_dir / "provenance.parquet")
        step("wrote Parquet")
        quarantine_lines = []
        for i in sorted(outcome.quarantined):
            rules = outcome.quarantined[i]
            quarantine_lines.append(json.dumps({"rules": rules, "reasons": {r: describe(i, r)["reason"] for r in rules},
                                                "pair": pairs[int(i)]}, sort_keys=True, ensure_ascii=False))
        prompts_by_split = {s: len({h for h, sp, qq in zip(frame.get("prompt_hash", []), split, q, strict=True)
                                    if sp == s and not qq}) for s in ("train", "test")}
    atomic_write_text(out_dir / "quarantine.jsonl", "".join(x + "\n" for x in quarantine_lines))
    atomic_write_text(out_dir / "filtered.jsonl",
                      "".join(json.dumps(f, sort_keys=True, ensure_ascii=False) + "\n" for f in (*filtered, *no_pair)))
    decon = {"ngram": p.decontam_ngram, "min_words": p.decontam_min_words, "sets": decon_info,
             "removed": sum(s["removed"] for s in decon_info.values())}
    atomic_write_json(reports_dir / DECONTAM_FILE, decon)
    metrics = _metrics(summary, counts, bin_counts, len(kept), len(no_pair), len(frame), outcome,
                       int(((split == "train") & ~q).sum()), int(((split == "test") & ~q).sum()), prompts_by_split)
    metrics.update(cut_counts(frame, split, q))
    return metrics


def cut_counts(frame, split, quarantined) -> dict[str, int]:
    """Per split, the written pairs whose chosen / rejected reply was cut at max_new_tokens, and those whose
    source does not say (null flags), so the dataset card can quote them."""
    out = {}
    for name in ("train", "test"):
        keep = (split == name) & ~quarantined
        for side in ("chosen", "rejected"):
            flags = frame[f"{side}_cut"] if f"{side}_cut" in frame else [None] * len(frame)
            out[f"cut.{side}_{name}"] = int(sum(f is True for f, k in zip(flags, keep, strict=True) if k))
        unknown = frame["chosen_cut"].isna() if "chosen_cut" in frame else np.ones(len(frame), dtype=bool)
        out[f"cut.unknown_{name}"] = int((np.asarray(unknown, dtype=bool) & keep).sum())
    return out


def _metrics(summary, counts, bin_counts, n_kept, n_no_pair, n_pairs, outcome, n_train, n_test, prompts) -> dict:
    m: dict[str, Any] = {"read": summary["input_rows"], "quarantined": summary["quarantined"],
                         "validated": summary["kept"]}
    for src, b in sorted(summary["by_source"].items()):
        m[f"read.{src}"] = b["rows"]
    # records ingest dropped on request before any row existed: outside `read`, counted here
    for k, n in (summary.get("excluded") or {"takedown": 0}).items():
        m[f"excluded.{k}"] = n
    for rule, n in sorted(summary["quarantined_by_rule"].items()):
        m[f"quarantined.{rule}"] = n
    for k in ("decontaminated", "weight", "exact_duplicate", "near_duplicate"):
        m[f"filtered.{k}"] = counts.get(k, 0)
    for k, n in sorted(counts.items()):
        if k.startswith("decontaminated."):
            m[f"filtered.{k}"] = n
    m["groups_binarized"] = n_kept
    m["filtered.no_pair"] = n_no_pair
    for k in ("too_few_rated", "tie", "below_margin", "unrated"):
        m[f"binarize.{k}"] = bin_counts.get(k, 0)
    m["pairs_built"] = n_pairs
    m["pairs_quarantined"] = len(outcome.quarantined)
    m["pairs_truncated"] = len(outcome.truncated)  # longer than max_length, left for TRL to cut
    m["pairs_train"], m["pairs_test"] = n_train, n_test
    m["prompts_train"], m["prompts_test"] = prompts["train"], prompts["test"]
    filtered = sum(counts.get(k, 0) for k in ("decontaminated", "weight", "exact_duplicate", "near_duplicate"))
    m["rows_unaccounted"] = m["read"] - m["quarantined"] - filtered - n_kept
    if m["rows_unaccounted"] != 0:
        raise RuntimeError(f"accounting bug: {m['rows_unaccounted']} rows neither kept nor filtered")
    return m


def test_prompt_hashes(dataset_dir: Path) -> set[str]:
    """Prompt hashes of a dataset's held-out (test) pairs, from its provenance table."""
    import pyarrow.parquet as pq

    t = pq.read_table(dataset_dir / "provenance.parquet", columns=["prompt_hash", "split"]).to_pydict()
    return {h for h, sp in zip(t["prompt_hash"], t["split"], strict=True) if sp == "test"}


def round_dataset(out_dir: Path, name: str, previous: Path | None) -> dict[str, int]:
    """A later round's pair ids named by the round (`r2/<id>`: the same prompt pairs again in every round);
    with `previous` (rounds.data accumulate) its train pairs and their provenance come first."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = {}
    for split in ("train", "test", "provenance"):
        f = out_dir / f"{split}.parquet"
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("id"), "id", pc.binary_join_element_wise(name, t["id"], "/"))
        if previous is not None and split != "test":
            old = pq.read_table(previous / f"{split}.parquet")
            if split == "provenance":
                old = old.filter(pc.equal(old["split"], "train"))
            t = pa.concat_tables([old.cast(t.schema), t])
            if split == "train":
                counts["pairs_train_accumulated"] = t.num_rows
        pq.write_table(t, f)
    return counts


def eval_sets_for(data: DataParams, own: dict[str, str], general_field: str = "prompt") -> list[EvalPromptSet]:
    """The project's own evaluation sets (`own`: paths key -> file) first, then data.decontaminate_against
    (a set already among the own ones is not read twice)."""
    sets = [EvalPromptSet(name=key, path=path, field=general_field if key == "general_prompts" else "prompt")
            for key, path in own.items()]
    mine = {Path(s.path) for s in sets}
    return sets + [s for s in data.decontaminate_against if Path(s.path) not in mine]


def check_set_records(sets: list[EvalPromptSet], own: dict[str, str], records: Path, root: Path) -> None:
    """Each set file must be the one its decontam stage hashed (so DVC tracked what build reads): the own
    sets are in `_own.json`, each other set in `<name>.json`."""
    from pipeline.core.lineage import sha256_file

    def recorded(name: str) -> dict:
        try:
            return read_json(records / f"{name}.json")
        except DataError:
            return {}

    own_records = {r.get("name"): r for r in recorded("_own").get("sets", []) if isinstance(r, dict)}
    for s in sets:
        want = (own_records.get(s.name) if s.name in own else recorded(s.name)) or {}
        want = want.get("sha256")
        file = Path(s.path) if Path(s.path).is_absolute() else root / s.path
        have = sha256_file(file) if file.is_file() else "missing"
        if have != want:
            raise SourceError(f"decontamination set {s.name}: {s.path} has sha256 {have}, its record in "
                              f"{records} says {want} (run `dvc repro build`)")


def check_roles(roles: dict[str, str], b: BuildParams, root: Path) -> None:
    """Train, dev and test prompts must be disjoint (exact text or a shared n-gram, build's own
    decontamination rule): a dev or test prompt seen in training, or a test prompt that selection saw,
    would make the reported number a measure of memory or of choice."""
    problems = role_overlaps(roles, b.decontam_ngram, b.decontam_min_words, root)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0].split(" (")[0], None, "prompt roles are disjoint", problems[0] + more)


def _body(ctx: StageContext) -> None:
    pr = ctx.params
    validated = ctx.path("validated")
    ctx.add_input(validated, name="validated")
    own = pr.paths.own_eval_sets()
    check_roles(pr.paths.prompt_roles(), pr.build, ctx.root)
    sets = eval_sets_for(pr.data, own, pr.evaluate.general.field)
    check_set_records(sets, own, ctx.path("decontam_sets"), ctx.root)
    for s in sets:
        ctx.add_input(ctx.root / s.path if not Path(s.path).is_absolute() else s.path, name=f"eval:{s.name}")
    from pipeline.lm.template import check_template_dir

    base = ctx.path("base_model")
    ctx.record.extra["chat_template_sha256"] = check_template_dir(base, base, "build")  # token_length counts with it
    reports = ctx.path("reports")
    out = ctx.path("dataset")
    rnd = ctx.record.extra.get("round")  # a later DPO round (pipeline.core.rounds): round 1's test prompts held out
    with atomic_dir(out) as tmp:
        metrics = run(validated, pr.data, pr.build, pr.validate_, sets, ctx.path("base_model"), tmp, reports,
                      ctx.root, held_out=test_prompt_hashes(ctx.root / rnd["first_dataset"]) if rnd else None)
        if rnd:
            metrics.update(round_dataset(tmp, rnd["name"], ctx.root / rnd["dataset_in"] if rnd["data"] == "accumulate"
                                         else None))
    if rnd:  # what the round read besides its own rows, so the lineage tree shows where its pairs come from
        ctx.add_input(ctx.root / rnd["first_dataset"] / "provenance.parquet", name="held-out prompts (round 1)")
        if rnd["data"] == "accumulate":
            for split in ("train", "provenance"):
                ctx.add_input(ctx.root / rnd["dataset_in"] / f"{split}.parquet", name=f"accumulated {split}")
    atomic_write_json(ctx.path("metrics") / METRICS_FILE, metrics)
    ctx.add_output(out, rows=metrics["pairs_train"] + metrics["pairs_test"])
    ctx.add_output(reports / DECONTAM_FILE)
    ctx.add_output(ctx.path("metrics") / METRICS_FILE)
    ctx.record.extra["counts"] = metrics
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.add_output(reports / PAIRS_REPORT_DIR)
    # Reports only: the dataset itself is DVC's (cached, sha256 in lineage); copying it into MLflow's
    # artifact store would double the disk a million-row build takes.
    for f in (reports / DECONTAM_FILE, reports / PAIRS_REPORT_DIR / "report.json", ctx.path("metrics") / METRICS_FILE):
        ctx.run.log_artifact(f, artifact_path="build")


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage build_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "build_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
