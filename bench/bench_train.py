"""Benchmark: the train stage against a plain TRL DPOTrainer script on the same model, data and recipe.

    .venv/bin/python bench/bench_train.py [--pairs 48] [--epochs 2] [--model models/base]

(a) `trl-defaults`: a plain script, TRL's DPOConfig defaults changed only where this CPU needs it
    (fp32 instead of bf16 autocast, use_cpu) plus the shared recipe below.
(b) `stage-cold`: this stage's `run()` with params.yaml's settings and an empty reference log-prob cache
    (the reference pass is timed).
(c) `stage-warm`: the same with the cache filled by (b), as a rerun or a sweep over training params sees.
(d) `stage-bf16-cold`: (b) with train.precision = bf16 (opt-in bfloat16 autocast), its own cold reference cache.
(e) `stage-padded-cold`: (b) with train.packing = false (TRL's padded micro-batches), its own cold cache;
    not run by default (--variants adds it), for measuring what packing gives.
Shared recipe: LoRA r16/alpha32 on all linear layers, lr 2e-4, beta 0.1, max_length 512, seed 42,
global batch 8 = 4 per device x 2 accumulation, same pairs and epochs.

Each variant runs in its own process (peak RSS is per process). Throughput = non-padding tokens the
trainer processed (TRL's `num_tokens`) / seconds from building the trainer to the end of training
(tokenization and, for (b), the reference pass included). Data: prompts and answers from
../shared/data/llama-factory/dpo_en_demo.json, each answer cut to 10-120 words (seeded); random words
when that file is absent. Prints a Markdown table (medians over --repeats) and the ratios to (a).

MFU (model FLOPs utilisation) of the stage variants, against the machine's matmul peak in the variant's
precision, measured in this same run (a child process multiplies two 4096 x 4096 matrices with torch, in
fp32 and in bf16, threads = cores, before and after the variants; the higher rate counts): fp32 for
(b) and (c), bf16 for (d), whose share of the fp32 peak is shown beside it. FLOPs per processed token, for LoRA on SmolLM2-135M:
    4 x N_body          forward (2 N) + backward through the activations (2 N) of the 30 frozen
                        transformer layers (N_body = 106.2M parameters: 134.5M less the 28.3M embedding)
  + 6 x N_lora          the adapters: forward, gradient of the input, gradient of the weights
                        (r16 on the 7 linear layers of 30 blocks: N_lora = r x (in + out) summed = 4.9M)
  + 4 x N_head x c      the 576 x 49,152 tied LM head, forward and backward, on completion tokens only
                        (the stage's completion-only head; c = completion share of the tokens, measured)
  + 6 x L x d x S       causal attention scores and values (forward 2 L d S, backward twice that),
                        L = 30 layers, d = 576, S = mean sequence length
plus, for stage-cold, one reference forward per pair and epoch-1 tokens: 2 N_body + 2 N_head c + 2 L d S.
About 0.53 GFLOP per token on the bench data (0.248 per reference-forward token); padding is not counted. MFU = achieved FLOPs per CPU second / peak FLOPs per CPU second
(on an idle machine with threads = cores this equals the wall-clock ratio; per CPU second it is less
distorted by other jobs). The last line: `mfu 0.NN vs_trl_cpu X.XX mem_vs_trl Y.YY` for stage-cold,
the default run's first training (throughput ratio in tokens per CPU second, peak RSS ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import child_process  # bench/child_process.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "llama-factory" / "dpo_en_demo.json"
RECIPE = {"learning_rate": 2e-4, "beta": 0.1, "max_length": 512, "seed": 42, "logging_steps": 1}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` conversational pairs with answers of 10-120 words (see the module docstring)."""
    rng = random.Random(seed)
    cut = lambda text: " ".join(text.split()[: rng.randint(10, 120)])  # noqa: E731
    if SHARED.is_file():
        rows = json.loads(SHARED.read_text(encoding="utf-8"))
        rng.shuffle(rows)
        src = [(r["conversations"][-1]["value"], r["chosen"]["value"], r["rejected"]["value"]) for r in rows]
    else:
        vocab = "the a model answer short list word three because every time data line point".split()
        src = [(" ".join(rng.choices(vocab, k=30)),) * 3 for _ in range(n)]
    pairs = []
    for i, (prompt, chosen, rejected) in enumerate(src[:n]):
        pairs.append({"id": f"b{i}", "prompt": [{"role": "user", "content": " ".join(prompt.split()[:60])}],
                      "chosen": [{"role": "assistant", "content": cut(chosen)}],
                      "rejected": [{"role": "assistant", "content": cut(rejected)}]})
    return pairs


def _last(log_history: list[dict], key: str) -> float:
    return next((float(e[key]) for e in reversed(log_history) if key in e), float("nan"))


def run_baseline(model_dir: Path, data_dir: Path, work: Path, epochs: int) -> dict:
    """(a): what a user writes from TRL's docs, adjusted only for this CPU."""
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from pipeline.lm.loading import load_causal_lm, load_tokenizer
    from pipeline.stages.train import load_pairs

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args = DPOConfig(output_dir=str(work / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_train_epochs=epochs, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                     **RECIPE)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    train = load_pairs(data_dir / "train.parquet")
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    t0, c0 = time.monotonic(), time.process_time()
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft)
    trainer.train()
    seconds, cpu = time.monotonic() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "tokens": _last(trainer.state.log_history, "num_tokens"),
            "gradient_checkpointing": args.gradient_checkpointing}


def run_stage(model_dir: Path, data_dir: Path, work: Path, epochs: int, ref_dir: Path, precision: str = "auto",
              packing: bool = True) -> dict:
    """(b)-(e): this stage's run() with params.yaml's train settings, the shared recipe, `precision` and `packing`."""
    from pipeline.core.params import load_params
    from pipeline.stages.train import fingerprint, run

    p = load_params(ROOT / "params.yaml").train
    p.dpo = {**p.dpo, **RECIPE, "num_train_epochs": epochs}
    p.lora = p.lora.model_validate(LORA | {"enabled": True})
    p.global_batch_size = 8  # the recipe's; the micro-batch (and so accumulation) is the stage's own choice
    if os.environ.get("BENCH_PER_DEVICE"):  # for sizing the default only
        p.per_device_batch_size = int(os.environ["BENCH_PER_DEVICE"])
    p.checkpoint_every = 10_000  # a benchmark measures training, not checkpoint writes
    p.precision = precision
    p.packing = packing
    out = work / "model"
    out.mkdir(parents=True)
    t0, c0 = time.monotonic(), time.process_time()
    res = run(p, root=ROOT, base_dir=model_dir, dataset_dir=data_dir, out_dir=out, checkpoints_dir=work / "ckpt",
              ref_logps_dir=ref_dir, plots_dir=work / "plots", model_sha256="bench", base_ref="bench",
              fingerprint=fingerprint(p, "bench", "bench"))
    m = res["metrics"]
    return {"seconds": m["setup_s"] + m["train_runtime_s"], "tokens": m["tokens"], "ref_cache_hit": m["ref_logps_cache_hit"],
            "per_device": p.per_device_batch_size, "peak_rss_train_mb": m["peak_rss_train_mb"],
            "total_s": time.monotonic() - t0, "cpu_s": m["cpu_s"], "cpu_total_s": time.process_time() - c0}


def measure_peak(n: int = 4096, reps: int = 6, dtype: str = "float32") -> dict:
    """Matmul rate of this machine in `dtype` (torch, threads = cores): the MFU denominator."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b  # warm up the kernels and the allocator
    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(reps):
        a @ b
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    flops = reps * 2 * n**3
    return {"gflops_wall": flops / wall / 1e9, "gflops_per_cpu_s": flops / cpu / 1e9, "threads": torch.get_num_threads()}


def flops_per_token(model_dir: Path, pairs: list[dict]) -> dict:
    """The FLOP model of the module docstring, with the completion share and mean length from the data."""
    from safetensors import safe_open

    from pipeline.lm.loading import load_tokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    numel = {k: int(__import__("math").prod(v)) for k, v in sizes.items()}
    head = sum(v for k, v in numel.items() if "embed_tokens" in k or "lm_head" in k)
    body = sum(numel.values()) - head
    tok = load_tokenizer(model_dir)
    comp = total = 0
    seqs = []
    for p in pairs:
        prompt = len(tok.apply_chat_template(p["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False))
        for side in ("chosen", "rejected"):
            c = len(tok(p[side][0]["content"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
            comp, total = comp + c, total + prompt + c
            seqs.append(prompt + c)
    c_share, s_mean = comp / total, sum(seqs) / len(seqs)
    layers, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    attn = 2 * layers * d * s_mean
    # LoRA on every linear layer of the blocks (the recipe's all-linear): r x (in + out) per weight matrix
    lora = sum(LORA["r"] * sum(shape) for k, shape in sizes.items()
               if ".layers." in k and k.endswith("proj.weight") and len(shape) == 2)
    return {"train": 4 * body + 6 * lora + 4 * head * c_share + 3 * attn,
            "ref_forward": 2 * body + 2 * head * c_share + attn,
            "n_body": body, "n_head": head, "n_lora": lora, "completion_share": c_share, "mean_seq": s_mean}


def _child(args: argparse.Namespace) -> None:
    if args.child != "trl-defaults" or args.baseline_runtime == "tuned":
        from pipeline.core.runtime import tune

        tune()  # what `python -m pipeline.stages.train` does first: allocator and OpenMP wait policy
    from pipeline.core.runtime import facts
    from pipeline.train.report import peak_rss_mb

    if args.child == "peak":
        child_process.report({"fp32": measure_peak(), "bf16": measure_peak(dtype="bfloat16")})
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    if args.child == "trl-defaults":
        res = run_baseline(Path(args.model), Path(args.data), work, args.epochs)
    else:
        res = run_stage(Path(args.model), Path(args.data), work, args.epochs, Path(args.ref_dir),
                        precision="bf16" if "bf16" in args.child else "auto", packing="padded" not in args.child)
    res["peak_rss_mb"] = peak_rss_mb()
    res["runtime"] = facts()
    child_process.report(res)


def _spawn(variant: str, args: argparse.Namespace, data: Path, ref_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--data", str(data),
           "--epochs", str(args.epochs), "--ref-dir", str(ref_dir), "--baseline-runtime", args.baseline_runtime]
    # The environment as given: the baseline runs as a plain script would (OpenMP and glibc defaults) unless
    # --baseline-runtime tuned; the stage variants choose their runtime as the stage does.
    return child_process.run(cmd, cwd=ROOT, env=dict(os.environ), label=variant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 pairs x 2 epochs (~5 minutes a repeat on an idle 2-core machine)")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="runs of each variant (default 1)")
    ap.add_argument("--model", default=str(ROOT / "models" / "base"))
    ap.add_argument("--variants", default="trl-defaults,stage-cold,stage-warm,stage-bf16-cold")
    ap.add_argument("--baseline-runtime", choices=("plain", "tuned"), default="plain",
                    help="plain: the TRL script with OpenMP's and glibc's defaults; tuned: the stage's allocator "
                         "and wait policy too (pipeline/core/runtime.py)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.epochs = 16, 2
    args.repeats = args.repeats or 1
    sys.path.insert(0, str(ROOT))
    if args.child:
        return _child(args)

    import pyarrow as pa
    import pyarrow.parquet as pq

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        pairs = make_pairs(args.pairs)
        pq.write_table(pa.Table.from_pylist(pairs), data / "train.parquet")
        peaks = [_spawn("peak", args, data, data)]
        for _ in range(args.repeats):
            ref_dir = Path(tempfile.mkdtemp(prefix="ref-", dir=tmp))  # cold for stage-cold, then warm
            for v in args.variants.split(","):
                r = _spawn(v, args, data, ref_dir)
                print(f"  {v}: {json.dumps(r)}", file=sys.stderr, flush=True)
                results.setdefault(v, []).append(r)
        peaks.append(_spawn("peak", args, data, data))
    base = results.get("trl-defaults")
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "cpu_s", "tokens", "peak_rss_mb")}
           for v, rs in results.items()}
    print(f"\n{args.pairs} pairs x {args.epochs} epochs, model {Path(args.model).name}, "
          f"medians of {args.repeats} run(s)\n")
    print("| variant | runtime | wall s | CPU s | tokens | tokens/s (wall) | tokens/CPU-s | peak RSS (MB) "
          "| throughput vs (a) | peak RSS vs (a) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, m in med.items():
        tps = m["tokens"] / m["seconds"]
        if base:
            b = med["trl-defaults"]
            ratio_t = f"{tps / (b['tokens'] / b['seconds']):.2f}x"
            ratio_m = f"{m['peak_rss_mb'] / b['peak_rss_mb']:.2f}x"
        else:
            ratio_t = ratio_m = "-"
        rt = results[v][-1].get("runtime", {})
        print(f"| {v} | {rt.get('allocator', '?')}, OMP {rt.get('omp_wait_policy', '?')} | {m['seconds']:.1f} | {m['cpu_s']:.1f} | {m['tokens']:.0f} | {tps:.1f} "
              f"| {m['tokens'] / m['cpu_s']:.1f} | {m['peak_rss_mb']:.0f} | {ratio_t} | {ratio_m} |")
    report_mfu(args, results, peaks, pairs)




def report_mfu(args, results: dict, peaks: list[dict], pairs: list[dict]) -> None:
    fl = flops_per_token(Path(args.model), pairs)
    best = {d: max((x[d] for x in peaks), key=lambda x: x["gflops_per_cpu_s"]) for d in ("fp32", "bf16")}
    peak = best["fp32"]
    print(f"\nFLOPs per token: {fl['train'] / 1e9:.3f} GFLOP training (N_body {fl['n_body'] / 1e6:.1f}M, N_lora "
          f"{fl['n_lora'] / 1e6:.2f}M, N_head {fl['n_head'] / 1e6:.1f}M, completion share {fl['completion_share']:.2f}, mean length {fl['mean_seq']:.0f}); "
          f"reference forward {fl['ref_forward'] / 1e9:.3f} GFLOP per token of one epoch")
    print(f"fp32 matmul peak (4096^2, {peak['threads']} threads): {peak['gflops_wall']:.0f} GFLOP/s wall, "
          f"{peak['gflops_per_cpu_s']:.0f} GFLOP per CPU-s; all measurements: "
          + ", ".join(f"{x['fp32']['gflops_wall']:.0f}/{x['fp32']['gflops_per_cpu_s']:.0f}" for x in peaks))
    print(f"bf16 matmul peak (same shape): {best['bf16']['gflops_wall']:.0f} GFLOP/s wall, "
          f"{best['bf16']['gflops_per_cpu_s']:.0f} GFLOP per CPU-s; the bf16 variant's MFU is against it")
    print("\n| variant | precision | GFLOP | GFLOP/s (wall) | GFLOP per CPU-s | MFU (per CPU-s) | MFU (wall) | of the fp32 peak (per CPU-s) |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|")
    mfu = {}
    for v, rs in results.items():
        if v == "trl-defaults":
            continue
        tok, wall, cpu = (statistics.median(x[k] for x in rs) for k in ("tokens", "seconds", "cpu_s"))
        total = tok * fl["train"] + (tok / args.epochs * fl["ref_forward"] if v.endswith("cold") else 0.0)
        own = best["bf16"] if "bf16" in v else peak
        mfu[v] = total / cpu / 1e9 / own["gflops_per_cpu_s"]
        print(f"| {v} | {'bf16' if 'bf16' in v else 'fp32'} | {total / 1e9:.0f} | {total / wall / 1e9:.1f} | {total / cpu / 1e9:.1f} "
              f"| {mfu[v]:.2f} | {total / wall / 1e9 / own['gflops_wall']:.2f} | {total / cpu / 1e9 / peak['gflops_per_cpu_s']:.2f} |")
    if "trl-defaults" in results and "stage-cold" in results:
        med = {v: {k: statistics.median(x[k] for x in rs) for k in ("cpu_s", "tokens", "peak_rss_mb")} for v, rs in results.items()}
        a, b = med["trl-defaults"], med["stage-cold"]
        vs = (b["tokens"] / b["cpu_s"]) / (a["tokens"] / a["cpu_s"])
        if "stage-bf16-cold" in med:
            c = med["stage-bf16-cold"]
            print(f"\nbf16 (opt-in): mfu {mfu['stage-bf16-cold']:.2f} of the bf16 peak, vs_trl_cpu "
                  f"{(c['tokens'] / c['cpu_s']) / (a['tokens'] / a['cpu_s']):.2f} mem_vs_trl {c['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
        print(f"\nmfu {mfu['stage-cold']:.2f} vs_trl_cpu {vs:.2f} mem_vs_trl {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
