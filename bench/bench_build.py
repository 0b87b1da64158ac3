"""Benchmark: ingest -> validate -> build on synthetic UltraFeedback-shaped data at growing sizes.

    .venv/bin/python bench/bench_build.py [--sizes 100000 300000 1000000] [--repeats 3] [--out bench/RESULTS_build.md]

Data (seeded): prompts of 12-40 words drawn Zipf-like from a vocabulary (the words of
../shared/data/llama-factory/dpo_en_demo.json by frequency, so tokenization behaves as on English text), 4 completions per
prompt (30-80 words each) with the four UltraFeedback aspects rated "1".."5" (some "N/A") and short
rationales; 2% of prompts repeated exactly, 2% repeated with one word changed (near duplicates), 0.5%
taken from the evaluation set (planted contamination). Size = completion rows, so 1M rows = 250k prompts.
The evaluation set has 5,000 prompts. Build runs with the params.yaml defaults (best_vs_worst, MinHash
near-dup at 64 permutations, 13-gram decontamination) and the token-length check with the tokenizer of
paths.base_model when it exists.

Each size and repeat runs in a fresh child process that reports its own wall time per stage and its
peak RSS (ru_maxrss). The table shows medians; the baseline is the smallest size measured in the same
run, and the ratio column is seconds per million rows relative to it (1.00 = perfectly linear).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = 5000


def _vocab(rng: random.Random, n: int = 20000) -> list[str]:
    """English words by frequency from the LLaMA-Factory demo file (realistic tokenization); random
    letter strings when that file is absent."""
    src = ROOT.parent / "shared" / "data" / "llama-factory" / "dpo_en_demo.json"
    if src.exists():
        counts = Counter(re.findall(r"[A-Za-z]+", src.read_text(encoding="utf-8")))
        words = [w for w, _ in counts.most_common(n)]
        if len(words) >= 1000:
            return words
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _sentence(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    k = rng.randint(lo, hi)
    # Zipf-like: squaring a uniform draw favours the head of the vocabulary.
    return " ".join(vocab[int(rng.random() ** 2 * len(vocab))] for _ in range(k)).capitalize() + "."


def make_data(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Write source.jsonl (rows completions, 4 per prompt) and eval.jsonl (5,000 prompts) into folder."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    eval_prompts = [_sentence(rng, vocab, 15, 40) for _ in range(EVAL_PROMPTS)]
    eval_path = folder / "eval.jsonl"
    with open(eval_path, "w") as f:
        for i, p in enumerate(eval_prompts):
            f.write(json.dumps({"id": f"e{i}", "prompt": p}) + "\n")
    src = folder / "source.jsonl"
    prompts: list[str] = []
    aspects = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    with open(src, "w") as f:
        for _ in range(rows // 4):
            r = rng.random()
            if r < 0.02 and prompts:
                prompt = rng.choice(prompts)
            elif r < 0.04 and prompts:
                ws = rng.choice(prompts).split()
                ws[rng.randrange(len(ws))] = rng.choice(vocab)
                prompt = " ".join(ws)
            elif r < 0.045:
                prompt = rng.choice(eval_prompts)
            else:
                prompt = _sentence(rng, vocab, 12, 40)
            prompts.append(prompt)
            completions = []
            for m in range(4):
                ann = {a: {"Rating": "N/A" if rng.random() < 0.03 else str(rng.randint(1, 5)),
                           "Rationale": "Short rationale."} for a in aspects}
                completions.append({"model": f"model-{m}", "principle": "helpfulness",
                                    "response": _sentence(rng, vocab, 30, 80), "annotations": ann})
            f.write(json.dumps({"source": "synthetic", "instruction": prompt, "models": [f"model-{m}" for m in range(4)],
                                "completions": completions}) + "\n")
    return src, eval_path


def child(rows: int, workdir: Path, token_check: bool = True) -> dict:
    """One measured run (in its own process): generate, then time ingest, validate, build."""
    sys.path.insert(0, str(ROOT))
    from pipeline.params import DataParams, EvalPromptSet, load_params
    from pipeline.stages import build, ingest, validate

    params = load_params(ROOT / "params.yaml")
    src, eval_path = make_data(workdir, rows)
    data = DataParams.model_validate({"sources": [{"name": "synthetic", "format": "ultrafeedback",
                                                   "path": str(src), "license": "CC-BY-4.0"}]})
    tokenizer = ROOT / params.paths.base_model
    tokenizer = tokenizer if token_check and (tokenizer / "tokenizer_config.json").exists() else None
    times = {}
    for d in ("ingested", "validated", "dataset", "reports"):
        (workdir / d).mkdir()
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = u0.ru_utime + u0.ru_stime
    t0 = time.perf_counter()
    ingest.run(data, params.paths, workdir / "ingested", ROOT)
    times["ingest"] = time.perf_counter() - t0
    t = time.perf_counter()
    validate.run(workdir / "ingested" / "rows.jsonl", data.sources, params.validate_.rows,
                 params.validate_.max_quarantine_fraction, workdir / "validated", workdir / "reports" / "validation")
    times["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = build.run(workdir / "validated", data, params.build, params.validate_,
                        [EvalPromptSet(name="eval", path=str(eval_path), field="prompt")], tokenizer,
                        workdir / "dataset", workdir / "reports", ROOT)
    times["build"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rows": rows, "times": times, "peak_rss_mb": usage.ru_maxrss / 1024, "tokenizer": tokenizer is not None,
            "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
            "metrics": {k: metrics[k] for k in ("filtered.exact_duplicate", "filtered.near_duplicate",
                                                "filtered.decontaminated", "pairs_train", "pairs_test")}}


def measure(rows: int, token_check: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        env = {**os.environ, "OPENRELEASE_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
               "GX_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        cmd = [sys.executable, __file__, "--child", str(rows), "--workdir", tmp]
        out = subprocess.run(cmd + ([] if token_check else ["--no-token-check"]), env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"child for {rows} rows failed with exit code {out.returncode}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[int, list[dict]]) -> str:
    sizes = sorted(results)
    base = sizes[0]
    med = {n: {k: statistics.median(r["times"][k] for r in results[n]) for k in results[n][0]["times"]} for n in sizes}
    base_per_m = med[base]["total"] / base * 1e6
    lines = [f"Baseline: the {base:,}-row run in this same invocation (ratio = seconds per million rows / baseline's).",
             "",
             "| completion rows | prompts | runs | ingest s | validate s | build s | total s (median) | s per 1M rows "
             "| ratio to baseline | peak RSS MB (max) | near-dup | exact-dup | decontaminated | pairs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        m, r0 = med[n], results[n][0]
        per_m = m["total"] / n * 1e6
        mm = r0["metrics"]
        lines.append(f"| {n:,} | {n // 4:,} | {len(results[n])} | {m['ingest']:.1f} | {m['validate']:.1f} | "
                     f"{m['build']:.1f} | {m['total']:.1f} | {per_m:.1f} | {per_m / base_per_m:.2f} | "
                     f"{max(r['peak_rss_mb'] for r in results[n]):,.0f} | {mm['filtered.near_duplicate']:,} | "
                     f"{mm['filtered.exact_duplicate']:,} | {mm['filtered.decontaminated']:,} | "
                     f"{mm['pairs_train'] + mm['pairs_test']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) to this file")
    ap.add_argument("--no-token-check", action="store_true",
                    help="skip the pairs suite's token-length rule (no tokenizer), to see its cost")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.workdir, not args.no_token_check)))
        return
    results: dict[int, list[dict]] = {}
    for n in sorted(args.sizes):
        for rep in range(args.repeats):
            r = measure(n, not args.no_token_check)
            results.setdefault(n, []).append(r)
            print(f"{n:>9,} rows, run {rep + 1}: {r['times']['total']:.1f}s "
                  f"(ingest {r['times']['ingest']:.1f}, validate {r['times']['validate']:.1f}, "
                  f"build {r['times']['build']:.1f}), peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
