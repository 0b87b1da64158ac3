"""Profile: where the train stage's optimizer steps spend their time, and the MFU they could reach.

    .venv/bin/python bench/profile_train.py [--pairs 16] [--epochs 2]

The speed issue asks training for MFU >= 0.6 of the machine's fp32 matmul peak. Training does its
arithmetic in matrix multiplications; everything else (attention's softmax, RMSNorm, SiLU, rotary
embeddings, the DPO loss, AdamW, autograd's bookkeeping) is time in which no model FLOP counts. This
script runs the stage's `run()` on bench_train's data (the same pairs, recipe and FLOP model), three
times in one process: once to fill the reference log-prob cache, once timed without the profiler, once
under torch.profiler. It prints the GEMM share of the profiled run's CPU time (aten::mm / addmm / bmm /
baddbmm self time), the attention kernels' share, the largest other ops, the measured MFU and the MFU
ceiling if every op but the GEMMs took no time (FLOPs / GEMM seconds / peak): the most any change that
keeps the arithmetic could reach.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    args = ap.parse_args()
    from pipeline.core.runtime import tune

    tune()  # what `python -m pipeline.stages.train` does first, before torch is imported
    import pandas as pd
    import torch
    from bench_train import flops_per_token, make_pairs, measure_peak, run_stage
    from torch.profiler import ProfilerActivity

    pairs = make_pairs(args.pairs)
    work = Path(tempfile.mkdtemp(prefix="profile-train-"))
    data = work / "data"
    data.mkdir()
    pd.DataFrame(pairs).to_parquet(data / "train.parquet")
    ref = work / "ref"
    flops = flops_per_token(args.model, pairs)
    load0 = os.getloadavg()[0]
    peak = measure_peak()["gflops_wall"]
    run_stage(args.model, data, work / "fill", args.epochs, ref)  # the reference cache: later runs train only
    plain = run_stage(args.model, data, work / "plain", args.epochs, ref)
    c0 = time.process_time()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = run_stage(args.model, data, work / "profiled", args.epochs, ref)
    cpu = time.process_time() - c0
    ops = prof.key_averages()
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in ops}
    total = sum(self_s.values())
    gemm = sum(v for k, v in self_s.items() if k in GEMM)
    attn = sum(v for k, v in self_s.items() if "attention" in k or "flash" in k)
    threads = torch.get_num_threads()
    train_flops = plain["tokens"] * flops["train"]
    mfu = train_flops / plain["seconds"] / (peak * 1e9)
    # GEMM kernels are long, so the profiler's per-op overhead hardly touches their self time: it stands
    # for the time the arithmetic needs at the speed the GEMMs ran (the profiler inflates the short ops).
    gemm_wall = gemm
    ceiling = train_flops / gemm_wall / (peak * 1e9)
    others = sorted(((k, v) for k, v in self_s.items() if k not in GEMM), key=lambda kv: kv[1], reverse=True)[:8]
    print(f"\n{args.pairs} pairs x {args.epochs} epochs, {plain['tokens']:.0f} tokens, {flops['train'] / 1e9:.3f} GFLOP "
          f"per token (bench_train's model); fp32 peak {peak:.0f} GFLOP/s wall, {threads} threads; "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print(f"unprofiled run: {plain['seconds']:.1f} s wall, {plain['cpu_s']:.1f} CPU-s, MFU {mfu:.2f}")
    print(f"profiled run: {profiled['seconds']:.1f} s wall, {cpu:.1f} CPU-s in the process; op self time {total:.1f} s\n")
    print("| part | self s | share |")
    print("|---|---:|---:|")
    print(f"| GEMM ({', '.join(GEMM)}) | {gemm:.1f} | {gemm / total:.2f} |")
    print(f"| attention kernels | {attn:.1f} | {attn / total:.2f} |")
    print(f"| everything else | {total - gemm - attn:.1f} | {(total - gemm - attn) / total:.2f} |")
    print("\nlargest non-GEMM ops (self s): " + ", ".join(f"{k} {v:.1f}" for k, v in others))
    print(f"\nMFU {mfu:.2f}; ceiling with GEMM time alone: {ceiling:.2f} "
          f"(GEMMs run at {train_flops / gemm_wall / 1e9:.0f} GFLOP/s of the {peak:.0f} peak)")


if __name__ == "__main__":
    main()
