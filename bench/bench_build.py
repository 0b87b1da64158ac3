"""Benchmark: ingest -> validate -> build on synthetic UltraFeedback-shaped data at growing sizes.

    .venv/bin/python bench/bench_build.py [--sizes 100000 300000 1000000] [--repeats 3]
                                          [--token-check on|off|both] [--out bench/RESULTS_build.md]

Data (seeded, written once per size, not timed): prompts of 12-40 words drawn by Zipf's law from the
words of ../shared/data/llama-factory/dpo_en_demo.json (so tokenization behaves as on English text;
random letter strings when that file is absent), 4 completions per prompt (30-80 words each) with
the four UltraFeedback aspects rated "1".."5" (3% "N/A") and rationales; 2% of prompts repeated
exactly, 2% repeated with one word changed (near duplicates), 0.5% copied from the evaluation set
(planted contamination). Size = completion rows, so 1M rows = 250k prompts. The evaluation set has
5,000 prompts. Params: params.yaml (best_vs_worst, MinHash near-dup at 64 permutations, 13-gram
decontamination, GX suites on rows and pairs). The pairs suite's token-length rule needs the tokenizer
of paths.base_model; `--token-check both` (default) measures with and without it.

Each run is a fresh child process that reports its wall and CPU time per stage and its peak RSS
(ru_maxrss: memory-mapped Arrow pages it touched count too). The table shows medians; the baseline
is the smallest size of the same variant measured in the same invocation, and the ratio column is
seconds per million rows relative to it (1.00 = perfectly linear).
"""

from __future__ import annotations

import argparse
import itertools
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


def _sentence(rng: random.Random, vocab: list[str], weights: list[float], lo: int, hi: int) -> str:
    return " ".join(rng.choices(vocab, cum_weights=weights, k=rng.randint(lo, hi))).capitalize() + "."


def make_data(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Write source.jsonl (rows completions, 4 per prompt) and eval.jsonl (5,000 prompts) into folder."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocab))))  # Zipf's law
    eval_prompts = [_sentence(rng, vocab, weights, 15, 40) for _ in range(EVAL_PROMPTS)]
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
                prompt = _sentence(rng, vocab, weights, 12, 40)
            prompts.append(prompt)
            completions = []
            for m in range(4):
                ann = {a: {"Rating": "N/A" if rng.random() < 0.03 else str(rng.randint(1, 5)),
                           "Rationale": "Short rationale."} for a in aspects}
                completions.append({"model": f"model-{m}", "principle": "helpfulness",
                                    "response": _sentence(rng, vocab, weights, 30, 80), "annotations": ann})
            f.write(json.dumps({"source": "synthetic", "instruction": prompt, "models": [f"model-{m}" for m in range(4)],
                                "completions": completions}) + "\n")
    return src, eval_path


def child(rows: int, data_dir: Path, workdir: Path, token_check: bool = True) -> dict:
    """One measured run (in its own process): time ingest, validate and build over data_dir's files."""
    sys.path.insert(0, str(ROOT))
    from pipeline.core.params import DataParams, EvalPromptSet, load_params
    from pipeline.stages import build, ingest, validate

    params = load_params(ROOT / "params.yaml")
    src, eval_path = data_dir / "source.jsonl", data_dir / "eval.jsonl"
    data = DataParams.model_validate({"sources": [{"name": "synthetic", "format": "ultrafeedback",
                                                   "path": str(src), "license": "CC-BY-4.0"}]})
    tokenizer = ROOT / params.paths.base_model
    tokenizer = tokenizer if token_check and (tokenizer / "tokenizer_config.json").exists() else None
    for d in ("ingested", "validated", "dataset", "reports"):
        (workdir / d).mkdir()
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}

    def timed(name, fn, *args):
        u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn(*args)
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        times[name] = time.perf_counter() - t0
        cpu[name] = u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime
        rss[name] = u1.ru_maxrss / 1024  # peak so far (ru_maxrss never goes down)
        return out

    timed("ingest", ingest.run, data, params.paths, workdir / "ingested", ROOT)
    timed("validate", validate.run, workdir / "ingested" / "rows.jsonl", data.sources, params.validate_.rows,
          params.validate_.max_quarantine_fraction, workdir / "validated", workdir / "reports" / "validation")
    metrics = timed("build", build.run, workdir / "validated", data, params.build, params.validate_,
                    [EvalPromptSet(name="eval", path=str(eval_path), field="prompt")], tokenizer,
                    workdir / "dataset", workdir / "reports", ROOT)
    times["total"], cpu["total"] = sum(times.values()), sum(cpu.values())
    return {"rows": rows, "times": times, "cpu": cpu, "peak_rss_mb": max(rss.values()), "peak_rss_after_mb": rss,
            "tokenizer": tokenizer is not None,
            "metrics": {k: metrics[k] for k in ("filtered.exact_duplicate", "filtered.near_duplicate",
                                                "filtered.decontaminated", "pairs_train", "pairs_test")}}


def measure(rows: int, data_dir: Path, token_check: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        env = {**os.environ, "OPENRELEASE_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
               "GX_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        cmd = [sys.executable, __file__, "--child", str(rows), "--data", str(data_dir), "--workdir", tmp]
        out = subprocess.run(cmd + ([] if token_check else ["--no-token-check"]), env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"child for {rows} rows failed with exit code {out.returncode}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[tuple[int, bool], list[dict]]) -> str:
    keys = sorted(results, key=lambda k: (not k[1], k[0]))
    med = {k: {s: statistics.median(r["times"][s] for r in results[k]) for s in results[k][0]["times"]} for k in keys}
    cpu = {k: statistics.median(r["cpu"]["total"] for r in results[k]) for k in keys}
    base = {check: min(n for n, c in keys if c == check) for _, check in keys}
    lines = ["Baseline (ratio 1.00): the smallest size of the same variant, measured in this same invocation; "
             "ratio = seconds per million rows / the baseline's (1.00 = linear).", "",
             "| token check | completion rows | prompts | runs | ingest s | validate s | build s | total s (median) "
             "| CPU s | s per 1M rows | ratio to baseline | peak RSS MB (max) | near-dup | exact-dup | decontaminated "
             "| pairs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, check in keys:
        m, mm = med[(n, check)], results[(n, check)][0]["metrics"]
        per_m = m["total"] / n * 1e6
        b = med[(base[check], check)]["total"] / base[check] * 1e6
        lines.append(f"| {'on' if check else 'off'} | {n:,} | {n // 4:,} | {len(results[(n, check)])} | "
                     f"{m['ingest']:.1f} | {m['validate']:.1f} | {m['build']:.1f} | {m['total']:.1f} | "
                     f"{cpu[(n, check)]:.1f} | {per_m:.1f} | {per_m / b:.2f} | "
                     f"{max(r['peak_rss_mb'] for r in results[(n, check)]):,.0f} | {mm['filtered.near_duplicate']:,} | "
                     f"{mm['filtered.exact_duplicate']:,} | {mm['filtered.decontaminated']:,} | "
                     f"{mm['pairs_train'] + mm['pairs_test']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) to this file")
    ap.add_argument("--token-check", choices=["on", "off", "both"], default="both",
                    help="the pairs suite's token-length rule (tokenizer of paths.base_model): on, off, or both "
                         "variants (to see its cost)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-token-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.data, args.workdir, not args.no_token_check)))
        return
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.token_check]
    results: dict[tuple[int, bool], list[dict]] = {}
    for n in sorted(args.sizes):
        with tempfile.TemporaryDirectory(prefix="bench-build-data-") as data_dir:
            t0 = time.perf_counter()
            make_data(Path(data_dir), n)
            print(f"{n:>9,} rows: synthetic data written in {time.perf_counter() - t0:.0f}s (not timed)", flush=True)
            for check in variants:
                for rep in range(args.repeats):
                    r = measure(n, Path(data_dir), check)
                    results.setdefault((n, check), []).append(r)
                    print(f"{n:>9,} rows, token check {'on' if check else 'off'}, run {rep + 1}: "
                          f"{r['times']['total']:.1f}s (ingest {r['times']['ingest']:.1f}, validate "
                          f"{r['times']['validate']:.1f}, build {r['times']['build']:.1f}; CPU {r['cpu']['total']:.1f}s),"
                          f" peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
