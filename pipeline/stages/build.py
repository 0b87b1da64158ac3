"""Stage `build`: validated rows -> the DPO dataset (TRL conversational preference format).

Reads:  `paths.validated/rows.parquet` and `summary.json`; evaluation prompts to decontaminate against
        (`paths.eval_prompts`, always, plus `data.decontaminate_against`); the chat template of
        `paths.base_model` (token lengths); params `build`, `data`, `validate.pairs`,
        `validate.max_length`, `validate.max_quarantine_fraction`.
Writes: `paths.dataset/` train.parquet and test.parquet (columns: pipeline.pair_checks.COLUMNS),
        provenance.parquet (per pair: source row, license, generators, the ratings behind the choice,
        rule, seed, split), filtered.jsonl (every row that made no pair, with the filter's name),
        quarantine.jsonl (pairs set aside by the pairs suite); `paths.reports/decontamination.json`;
        `paths.reports/pairs_validation/` (report.json + GX Data Docs); `paths.metrics/data.json`.
Run:    `dvc repro build` (or `python -m pipeline.stages.build`).

Steps, in order, each counted in metrics/data.json: decontamination (exact match or word n-gram
overlap of any user turn with an eval prompt), source weights, exact duplicates (normalised prompt
hash), near duplicates (MinHash LSH), binarization (ties and margins below min_margin dropped),
the pairs suite (GX), the split (by a hash of seed and prompt hash). Rows are processed as
memory-mapped Arrow (`datasets`) in batched maps. Same inputs and seed give byte-identical files.

metrics/data.json (flat): read, read.<source>, quarantined, quarantined.<rule>, validated (rows kept by
validate); filtered.decontaminated, filtered.decontaminated.<eval set>, filtered.weight,
filtered.exact_duplicate, filtered.near_duplicate, filtered.no_pair (prompt groups); groups_binarized;
binarize.too_few_rated (groups), binarize.tie and binarize.below_margin (candidate pairs dropped),
binarize.unrated (completions without any rating); pairs_built, pairs_quarantined, pairs_train,
pairs_test, prompts_train, prompts_test; rows_unaccounted (always 0: the build stops otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dedup, pair_checks
from pipeline.binarize import binarize_table
from pipeline.decontam import EvalIndex, load_index
from pipeline.formats.common import excerpt
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from pipeline.params import BuildParams, DataParams, EvalPromptSet, ValidateParams
from pipeline.stage import StageContext, stage_main
from pipeline.validation import decide, run_suite, stepper

STAGE = "build"
READS = ["build", "data", "validate.pairs", "validate.max_length", "validate.max_quarantine_fraction",
         "paths.validated", "paths.eval_prompts", "paths.base_model", "paths.dataset", "paths.reports",
         "paths.metrics"]
OWN_EVAL_SET = "eval_prompts"
PROVENANCE = ("id", "source", "source_row", "license", "generator_chosen", "generator_rejected",
              "ratings_chosen", "ratings_rejected", "rule", "seed", "split", "prompt_hash")
PAIRS_REPORT_DIR, DECONTAM_FILE, METRICS_FILE = "pairs_validation", "decontamination.json", "data.json"

log = logging.getLogger(__name__)


def prompt_key(prompt: list[dict], norms: list[str] | None = None) -> str:
    """sha256 of the normalised prompt (roles + normalised text): the dedup and split key."""
    norms = norms if norms is not None else [dedup.normalize(m["content"]) for m in prompt]
    text = "\x1e".join(f"{m['role']}\x1f{n}" for m, n in zip(prompt, norms, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


def _unit(*parts: Any) -> float:
    """A uniform number in [0, 1) from a hash of the parts: seeded, order-free randomness."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16) / 2**64


def _prepare(batch, index: EvalIndex, hasher: dedup.WordHasher, p: BuildParams, perms):
    """Per row: the prompt hash, the first eval-set match (JSON, "" if none) and the MinHash signature."""
    import pyarrow as pa

    prompts = batch.column("prompt").to_pylist()
    user_words, user_ids, user_row, all_ids, keys = [], [], [], [], []
    for r, prompt in enumerate(prompts):
        row_ids: list[int] = []
        norms = [dedup.normalize(m["content"]) for m in prompt]
        keys.append(prompt_key(prompt, norms))
        for m, norm in zip(prompt, norms, strict=True):
            ws = dedup.words_of_normalized(norm)
            ids = hasher.ids(ws)
            row_ids += ids
            if m["role"] == "user":
                user_words.append(ws)
                user_ids.append(ids)
                user_row.append(r)
        all_ids.append(row_ids)
    contamination = [""] * len(prompts)
    for r, match in zip(user_row, index.match(user_words, user_ids), strict=True):
        if match is not None and not contamination[r]:
            contamination[r] = json.dumps(match.__dict__, sort_keys=True, ensure_ascii=False)
    cols = {"prompt_hash": pa.array(keys, pa.string()),
            "contamination": pa.array(contamination, pa.string())}
    if perms is not None:
        sig = dedup.minhash_signatures(all_ids, p.near_dup_shingle, perms)
        cols["minhash"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.uint32()), sig.shape[1])
    return pa.table(cols)


def column(ds, name: str) -> list:
    """A whole column as a Python list (one Arrow conversion, not one lookup per row)."""
    return ds.with_format("arrow")[name].to_pylist()


def filter_rows(prep, rows, data: DataParams, p: BuildParams, decon_info: dict) -> tuple[list[int], list[dict], Counter]:
    """Decide, in order, which prompt groups go on to binarization; every other one gets a reason:
    decontaminated, weight (source mixing), exact_duplicate, near_duplicate (of an earlier kept group).
    Per-row strings (ids, file:line) are looked up only for the rows that are filtered."""
    table = rows.with_format("arrow").select_columns(["id", "source", "source_file", "source_line"])[:]
    ident = table.column("id")

    def where(i: int) -> str:
        return f"{table.column('source_file')[i].as_py()}:{table.column('source_line')[i].as_py()}"

    weights = {s.name: s.weight for s in data.sources}
    sources = table.column("source").to_pylist() if any(w < 1.0 for w in weights.values()) else None
    hashes, contamination = column(prep, "prompt_hash"), column(prep, "contamination")
    reasons: dict[int, tuple[str, Any]] = {}
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if contamination[i]:
            m = json.loads(contamination[i])
            reasons[i] = ("decontaminated", m)
            decon_info[m["eval_set"]]["removed"] += 1
            decon_info[m["eval_set"]]["rows"].append({"id": ident[i].as_py(), "source_row": where(i), "match": m["kind"],
                                                      "eval_item": m["item"], "eval_text": m["text"]})
        elif sources is not None and weights.get(sources[i], 1.0) < 1.0 and _unit("weight", p.seed, h) >= weights[sources[i]]:
            reasons[i] = ("weight", None)
        elif h in first:
            reasons[i] = ("exact_duplicate", {"of": ident[first[h]].as_py()})
        else:
            first[h] = i
    del first, contamination
    if "minhash" in prep.column_names:
        eligible = np.array([i for i in range(len(hashes)) if i not in reasons], dtype=np.int64)
        arr = prep.with_format("arrow")["minhash"]
        arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
        sigs = arr.flatten().to_numpy().reshape(len(prep), -1)[eligible]
        for k, (j, jac) in dedup.near_duplicates(sigs, p.near_dup_threshold, p.near_dup_num_perm).items():
            reasons[int(eligible[k])] = ("near_duplicate", {"of": ident[int(eligible[j])].as_py(),
                                                            "jaccard": round(jac, 4)})
        del sigs
    kept, filtered, counts = [], [], Counter()
    for i in range(len(hashes)):
        if i not in reasons:
            kept.append(i)
            continue
        reason, detail = reasons[i]
        counts[reason] += 1
        if reason == "decontaminated":
            counts[f"decontaminated.{detail['eval_set']}"] += 1
        filtered.append({"id": ident[i].as_py(), "source_row": where(i), "reason": reason, "detail": detail})
    return kept, filtered, counts


def _binarize_batch(batch, indices: list[int], p: BuildParams, hashes: list[str], features, no_pair: list,
                    counts: Counter):
    """Arrow batch of prompt groups -> Arrow table of pairs (contract columns + provenance)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h = [hashes[i] for i in indices]
    rows, ci, ri, scores, drops = binarize_table(batch, h, p.binarize, p.min_margin, p.seed)
    ids, files, lines = (batch.column(c).to_pylist() for c in ("id", "source_file", "source_line"))
    comps = batch.column("completions").combine_chunks()
    offsets = np.searchsorted(pc.list_parent_indices(comps).to_numpy(), np.arange(batch.num_rows + 1))
    paired = set(rows)
    for r, dropped in drops:
        counts.update(dropped)
        if r not in paired:
            why = next(k for k in ("too_few_rated", "tie", "below_margin") if dropped.get(k))
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            no_pair.append({"id": ids[r], "source_row": f"{files[r]}:{lines[r]}", "reason": f"no_pair:{why}",
                            "detail": {"scores": [None if np.isnan(x) else float(x) for x in scores[lo:hi]]}})
    flat = comps.flatten()
    take_r, take_c, take_j = pa.array(rows, pa.int64()), pa.array(ci, pa.int64()), pa.array(ri, pa.int64())
    n = len(rows)

    def assistant(contents):
        msg = pa.StructArray.from_arrays([pa.array(["assistant"] * n, pa.string()), contents], names=["role", "content"])
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), msg)

    splits = ["test" if _unit("split", p.seed, h[r]) < p.test_fraction else "train" for r in rows]
    cols = {
        "id": pa.array([f"{ids[r]}#{c - offsets[r]}>{j - offsets[r]}" for r, c, j in zip(rows, ci, ri, strict=True)],
                       pa.string()),
        "prompt": batch.column("prompt").combine_chunks().take(take_r),
        "chosen": assistant(flat.field("content").take(take_c)),
        "rejected": assistant(flat.field("content").take(take_j)),
        "score_chosen": pa.array(scores[ci] if n else [], pa.float64()),
        "score_rejected": pa.array(scores[ri] if n else [], pa.float64()),
        "source": batch.column("source").combine_chunks().take(take_r),
        "source_row": pa.array([f"{files[r]}:{lines[r]}" for r in rows], pa.string()),
        "rule": pa.array([p.binarize] * n, pa.string()),
        "prompt_hash": pa.array([h[r] for r in rows], pa.string()),
        "license": batch.column("license").combine_chunks().take(take_r),
        "generator_chosen": flat.field("generator").take(take_c),
        "generator_rejected": flat.field("generator").take(take_j),
        "ratings_chosen": flat.field("ratings").take(take_c),
        "ratings_rejected": flat.field("ratings").take(take_j),
        "seed": pa.array([p.seed] * n, pa.int64()),
        "split": pa.array(splits, pa.string()),
    }
    return pa.table(cols).cast(features.arrow_schema)


def _pair_features():
    from datasets import Features, List, Value

    msg = {"role": Value("string"), "content": Value("string")}
    s = Value("string")
    rating = List({"aspect": Value("string"), "value": Value("float64")})
    return Features({"id": s, "prompt": List(msg), "chosen": List(msg), "rejected": List(msg),
                     "score_chosen": Value("float64"), "score_rejected": Value("float64"), "source": s,
                     "source_row": s, "rule": s, "prompt_hash": s, "license": s, "generator_chosen": s,
                     "generator_rejected": s, "ratings_chosen": rating, "ratings_rejected": rating,
                     "seed": Value("int64"), "split": s})


def check_pairs(pairs, counter: pair_checks.TokenCounter | None, v: ValidateParams, report_dir: Path | None,
                report_name: str, batch_size: int):
    """Run the pairs suite over the built pairs (a datasets.Dataset); return (Outcome, facts frame, describe)."""
    import pandas as pd

    cols: dict[str, list] = {}
    for batch in pairs.with_format("arrow").iter(batch_size=batch_size):
        facts = pair_checks.pair_facts(batch, counter)
        facts["split"] = batch.column("split").to_pylist()
        for k, vals in facts.items():
            cols.setdefault(k, []).extend(vals)
    if not cols:
        cols = {c: [] for c in (*pair_checks.COLUMNS, "text_min_chars", "chosen_differs", "tokens_max", "split")}
    cols["in_both_splits"] = pair_checks.split_overlap(cols.get("prompt_hash", []), cols["split"])
    frame = pd.DataFrame(cols)
    results = run_suite("pairs", frame, pair_checks.expectations(list(frame.columns), v.max_length),
                        v.pairs.model_dump(), docs_dir=report_dir / "docs" if report_dir else None)

    def excerpt_of(i: int) -> str:
        prompt = pairs[int(i)].get("prompt") or [{}]
        return excerpt(prompt[-1].get("content") or "", 60)

    describe = pair_checks.describer(frame, v.max_length, excerpt_of)
    outcome = decide(results, len(frame), v.max_quarantine_fraction, describe, report_name, unit="pairs")
    if report_dir is not None:
        outcome.report["data_docs"] = "docs/index.html"
        outcome.report["token_counting"] = dict(counter.stats) if counter else "off (no tokenizer)"
        atomic_write_json(report_dir / "report.json", outcome.report)
    return outcome, frame, describe


def write_parquet(table, rows: np.ndarray, columns, path: Path, chunk: int = 50_000) -> None:
    """The given rows and columns of an Arrow table (memory-mapped) to one Parquet file, chunk by chunk so
    memory stays flat. pyarrow's writer is deterministic: same table, same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table.select(list(columns))
    with pq.ParquetWriter(path, table.schema) as writer:
        for s in range(0, len(rows), chunk):
            writer.write_table(table.take(pa.array(rows[s : s + chunk], pa.int64())))
        if len(rows) == 0:
            writer.write_table(table.schema.empty_table())


def run(validated_dir: Path, data: DataParams, p: BuildParams, v: ValidateParams, eval_sets: list[EvalPromptSet],
        tokenizer_dir: Path | None, out_dir: Path, reports_dir: Path, root: Path) -> dict[str, Any]:
    """Build the dataset into `out_dir` and the reports into `reports_dir`; return the flat counts.

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
                        _prepare, batched=True, batch_size=p.batch_size, remove_columns=rows.column_names,
                        new_fingerprint="prepare",
                        fn_kwargs={"index": index, "hasher": hasher, "p": p, "perms": perms},
                        desc="Hashing prompts (dedup, decontamination)")
        step("hashed prompts")
        kept, filtered, counts = filter_rows(prep, rows, data, p, decon_info)
        step(f"filtered: {len(kept)} prompt groups kept, {len(filtered)} removed")
        no_pair: list[dict] = []
        bin_counts: Counter = Counter()
        features = _pair_features()
        kept_hashes = column(prep, "prompt_hash")
        kept_hashes = [kept_hashes[i] for i in kept]
        pairs = rows.select(kept).with_format("arrow").map(
            _binarize_batch, batched=True, batch_size=p.batch_size, with_indices=True,
            remove_columns=rows.column_names, features=features, new_fingerprint="binarize",
            fn_kwargs={"p": p, "hashes": kept_hashes, "features": features, "no_pair": no_pair, "counts": bin_counts},
            desc=f"Binarizing ({p.binarize})").with_format(None)
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
            write_parquet(table, np.flatnonzero((split == name) & ~q), pair_checks.COLUMNS, out_dir / f"{name}.parquet")
        write_parquet(table, np.flatnonzero(~q), PROVENANCE, out_dir / "provenance.parquet")
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
    return metrics


def _metrics(summary, counts, bin_counts, n_kept, n_no_pair, n_pairs, outcome, n_train, n_test, prompts) -> dict:
    m: dict[str, Any] = {"read": summary["input_rows"], "quarantined": summary["quarantined"],
                         "validated": summary["kept"]}
    for src, b in sorted(summary["by_source"].items()):
        m[f"read.{src}"] = b["rows"]
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
    m["pairs_train"], m["pairs_test"] = n_train, n_test
    m["prompts_train"], m["prompts_test"] = prompts["train"], prompts["test"]
    filtered = sum(counts.get(k, 0) for k in ("decontaminated", "weight", "exact_duplicate", "near_duplicate"))
    m["rows_unaccounted"] = m["read"] - m["quarantined"] - filtered - n_kept
    if m["rows_unaccounted"] != 0:
        raise RuntimeError(f"accounting bug: {m['rows_unaccounted']} rows neither kept nor filtered")
    return m


def eval_sets_for(data: DataParams, eval_prompts: str) -> list[EvalPromptSet]:
    """data.decontaminate_against plus the project's own eval prompts (unless already listed)."""
    sets = list(data.decontaminate_against)
    if not any(Path(s.path) == Path(eval_prompts) for s in sets):
        sets.insert(0, EvalPromptSet(name=OWN_EVAL_SET, path=eval_prompts, field="prompt"))
    return sets


def _body(ctx: StageContext) -> None:
    pr = ctx.params
    validated = ctx.path("validated")
    ctx.add_input(validated, name="validated")
    sets = eval_sets_for(pr.data, pr.paths.eval_prompts)
    for s in sets:
        ctx.add_input(ctx.root / s.path if not Path(s.path).is_absolute() else s.path, name=f"eval:{s.name}")
    reports = ctx.path("reports")
    out = ctx.path("dataset")
    with atomic_dir(out) as tmp:
        metrics = run(validated, pr.data, pr.build, pr.validate_, sets, ctx.path("base_model"), tmp, reports,
                      ctx.root)
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


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
