"""Profile: where decoding spends its time, transformers' `model.generate` against the stages' loop.

    .venv/bin/python bench/profile_decode.py [--prompts 32] [--max-new-tokens 96]
    .venv/bin/python bench/profile_decode.py --sample [--prompts 32] [--max-new-tokens 48]

The speed issue asks the loop (pipeline/lm/decode.py) for 4x `model.generate` in wall time. Both
decode the same tokens with the same model, so both do the same matrix multiplications; the loop can
only remove what is not matrix multiplication. This script runs each once under torch.profiler on the
same prompts (the first `--prompts` test and dev prompts, evaluate's batch size) and prints, per
backend, the wall time, the time in GEMM kernels (aten::mm / addmm / bmm, self time) and the rest.
`model.generate`'s wall time divided by the loop's GEMM time is the most any float32 loop on this CPU
could gain over it without doing less arithmetic (smaller precision, fewer tokens).

`--sample` profiles `generate`'s workload instead: the first `--prompts` train prompts, params.yaml's
`generate` samples per prompt, temperature, top_p and batch size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile(name: str, cache: str, model, tok, msgs, kw) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity

    from pipeline.lm.generation import generate

    generate(model, tok, msgs[:2], cache=cache, desc="warm-up", seed=0, **{**kw, "max_new_tokens": 4})
    t0 = time.monotonic()
    c0 = sum(os.times()[:2])
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tok, msgs, cache=cache, desc=name, seed=0, **kw)
    wall, cpu = time.monotonic() - t0, sum(os.times()[:2]) - c0
    ops = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM) / 1e6
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {"wall": wall, "cpu": cpu, "gemm": gemm,
            "top": ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.1f}s" for e in top)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: evaluate's 96, or generate's 48 with --sample")
    ap.add_argument("--sample", action="store_true", help="generate's sampling workload instead of evaluate's greedy one")
    args = ap.parse_args()
    from pipeline.constraints.prompts import read_prompts
    from pipeline.core.params import load_params
    from pipeline.core.runtime import tune
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    tune()
    params = load_params(ROOT / "params.yaml")
    if args.sample:
        g = params.generate
        rows = read_prompts(ROOT / params.paths.train_prompts)
        args.max_new_tokens = args.max_new_tokens or g.max_new_tokens
        kw = {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": g.temperature, "top_p": g.top_p,
              "num_return_sequences": g.samples_per_prompt, "batch_size": g.batch_size}
    else:
        rows = read_prompts(ROOT / params.paths.test_prompts) + read_prompts(ROOT / params.paths.dev_prompts)
        args.max_new_tokens = args.max_new_tokens or params.evaluate.generation.max_new_tokens
        kw = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "batch_size": params.evaluate.generation.batch_size}
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows[: args.prompts]]
    model_dir = ROOT / params.paths.base_model
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    load0 = os.getloadavg()[0]
    res = {name: profile(name, cache, model, tok, msgs, kw)
           for name, cache in (("model.generate", "dynamic"), ("loop", "preallocated"))}
    what = (f"sampling x{kw['num_return_sequences']} (temperature {kw['temperature']}, top_p {kw['top_p']})"
            if args.sample else "greedy")
    print(f"\n{what}, {len(msgs)} prompts, {args.max_new_tokens} new tokens at most, batch "
          f"{kw['batch_size']}, float32, under torch.profiler; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| backend | wall s | CPU s | GEMM s (self) | GEMM share of wall | not GEMM s | top ops (self time) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in res.items():
        print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['gemm']:.1f} | {r['gemm'] / r['wall']:.2f} "
              f"| {r['wall'] - r['gemm']:.1f} | {r['top']} |")
    g, lp = res["model.generate"], res["loop"]
    print(f"\nloop / model.generate wall: {g['wall'] / lp['wall']:.2f}x; the ceiling with the loop's GEMM time alone: "
          f"{g['wall'] / lp['gemm']:.2f}x")


if __name__ == "__main__":
    main()
