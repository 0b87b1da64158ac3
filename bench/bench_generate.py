"""Benchmark: generation backends on the `generate` stage's sampling and `evaluate`'s greedy decoding.

    .venv/bin/python bench/bench_generate.py [--quick] [--repeats 3] [--candidates transformers,ct2-int8,...]

Workloads (the real defaults): sampling = paths.train_prompts with the chat template, params.yaml's
`generate` decoding (samples_per_prompt, max_new_tokens, temperature, top_p, batch_size, seed); greedy =
what evaluate decodes per model (paths.test_prompts, paths.dev_prompts, paths.ifeval_prompts and
evaluate.general.max_prompts of paths.general_prompts) with `evaluate.generation` (max_new_tokens, batch_size). `--quick` takes every
k-th train prompt (48 x 4 samples = one batch of 192) and 3 candidates (transformers, loop, loop-bf16).
Model: SmolLM2-135M from `paths.base_model` (built with the base_model stage's run() when absent).

Baseline (ratio 1.00): `transformers` = transformers' `model.generate` with its dynamic KV cache, as
`generate` and `evaluate` decoded before pipeline/lm/decode.py, with that path's runtime: OMP_WAIT_POLICY
PASSIVE (the Makefile forced it then) and glibc's allocator. `loop` is pipeline/lm/decode.py
(generate.cache = preallocated, the default); `loop-bf16` is the same loop on a bfloat16 copy of the
weights (opt-in: generate.precision / evaluate.generation.precision = bfloat16); `transformers-static` is
model.generate with cache_implementation="static". Every run is its own process, and the candidates
choose their runtime as the stages do (pipeline/core/runtime.py: tcmalloc when installed, OpenMP
spinning when the machine is otherwise idle; `--candidate-runtime plain` gives them the baseline's).
Runs are interleaved (A, B, A, B, ...) so a change of load hits all alike. Per candidate: medians over
--repeats of new tokens/s (wall), new tokens per CPU second and CPU seconds per 1,000 completions
(getrusage of the run's process: every thread), its peak RSS while decoding (polled from /proc), and
quality on the same prompts: the share of greedy eval completions passing all their constraints (base
pass rate), the mean constraint-pass fraction of the sampled completions and their `rate` rating
histogram. Last line: `speedup sampling X.XX greedy Y.YY` (wall tokens/s of --backend over the
baseline, medians).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import child_process  # bench/child_process.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# "@bN" runs a backend at batch size N instead of params.yaml's (sequences per forward pass).
CANDIDATES = ("transformers", "transformers-static", "loop", "loop-bf16", "loop@b96", "loop@b192", "ct2-fp32", "ct2-int8",
              "ct2-int8@b96")
QUICK = ("transformers", "loop", "loop-bf16")
# The baseline decodes at the batch sizes params.yaml had before pipeline/lm/decode.py (48 sampled
# sequences, 32 greedy): the sizes measured fastest for model.generate, whose top-p sort grows with the batch.
BASELINE_BATCH = {"sampling": 48, "greedy": 32}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class PeakRSS:
    """Max resident set size of this process while the block runs (polled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        page = os.sysconf("SC_PAGE_SIZE")

        def poll():
            while not self._stop.is_set():
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(0.02)
        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def ensure_base_model(params) -> Path:
    out = ROOT / params.paths.base_model
    if not (out / "model.safetensors").is_file():
        from pipeline.core.io import atomic_dir
        from pipeline.stages import base_model

        print(f"building {out} with the base_model stage (reads the wheel's GGUF)", file=sys.stderr)
        with atomic_dir(out) as tmp:
            base_model.run(params.base_model, tmp)
    return out


def make_runner(name: str, model_dir: Path, model, tok, cache_root: Path):
    from pipeline.lm import ct2, generation

    base, _, batch = name.partition("@b")  # "ct2-int8@b96": the same backend at another batch size

    def run(prompts, workload, **kw):
        if batch:
            kw["batch_size"] = int(batch)
        elif name == "transformers":
            kw["batch_size"] = BASELINE_BATCH[workload]
        if base == "transformers":
            return generation.generate(model, tok, prompts, cache="dynamic", **kw)
        if base == "loop":
            return generation.generate(model, tok, prompts, cache="preallocated", **kw)
        if base == "loop-bf16":  # generate.quantization / evaluate.generation.precision = bfloat16
            return generation.generate(model, tok, prompts, cache="preallocated", precision="bfloat16", **kw)
        if base == "transformers-static":
            return generation.generate(model, tok, prompts, cache="static", **kw)
        q = {"ct2-fp32": "float32", "ct2-int8": "int8"}[base]
        return ct2.generate(model_dir, tok, prompts, quantization=q, cache_root=cache_root, **kw)
    return run


def quality(texts: list[list[str]], rows: list[dict]) -> dict:
    """Pass rates of the completions of the first len(texts) rows (the project's constraint prompts)."""
    from pipeline.constraints.prompts import check_row
    from pipeline.stages.rate import rating

    fracs = [statistics.mean(check_row(r, t)) for outs, r in zip(texts, rows[: len(texts)], strict=True) for t in outs]
    return {"all_pass": sum(f == 1.0 for f in fracs) / len(fracs), "mean_pass": statistics.mean(fracs),
            "ratings": dict(sorted(Counter(rating(f) for f in fracs).items()))}


def workloads(args, params, train, evals, extra) -> dict:
    g, e = params.generate, params.evaluate.generation
    work = {
        "sampling": (train, dict(max_new_tokens=g.max_new_tokens, do_sample=True, temperature=g.temperature, top_p=g.top_p,
                                 num_return_sequences=g.samples_per_prompt, batch_size=g.batch_size, seed=g.seed)),
        "greedy": (evals + extra, dict(max_new_tokens=e.max_new_tokens, do_sample=False, batch_size=e.batch_size, seed=0)),
    }
    if args.tiny:  # short completions: the check is the loop against model.generate, not the stages' lengths
        for _, kw in work.values():
            kw["max_new_tokens"] = min(kw["max_new_tokens"], 32)
    return {k: v for k, v in work.items() if k in args.workloads.split(",")}


def read_inputs(args):
    from pipeline.constraints.ifeval import read_ifeval
    from pipeline.constraints.prompts import read_prompts
    from pipeline.core.params import load_params
    from pipeline.eval.measures import read_general_prompts

    params = load_params(ROOT / "params.yaml")
    train = read_prompts(ROOT / params.paths.train_prompts)
    evals = read_prompts(ROOT / params.paths.test_prompts) + read_prompts(ROOT / params.paths.dev_prompts)
    if args.quick:
        train = train[:: max(1, len(train) // 48)][:48]
    if args.tiny:  # bench/quick.py: a regression check, not a measurement of the stages' workloads
        train, evals = train[:4], evals[:16]
    # What evaluate decodes greedily per model: eval prompts, the IFEval subset, the general prompts.
    extra = [{"prompt": r["prompt"]} for r in read_ifeval(ROOT / params.paths.ifeval_prompts)]
    extra += [{"prompt": r["prompt"]} for r in read_general_prompts(ROOT / params.paths.general_prompts, params.evaluate.general)]
    if args.tiny:
        extra = []
    return params, train, evals, extra


def child(args) -> None:
    """One timed run of one candidate on one workload, in this process; prints `RESULT {json}`."""
    if args.child != "transformers" and args.candidate_runtime == "stage":
        from pipeline.core.runtime import tune

        tune()  # what the generate and evaluate stages do first: allocator and OpenMP wait policy
    from pipeline.core.runtime import facts
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    params, train, evals, extra = read_inputs(args)
    model_dir = ROOT / params.paths.base_model
    rows, kw = workloads(args, params, train, evals, extra)[args.workload]
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    run = make_runner(args.child, model_dir, model, tok, ROOT / params.paths.converted_models)
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    st: dict = {}
    c0, t0 = cpu_s(), time.monotonic()
    with PeakRSS() as rss:
        texts = run(msgs, args.workload, desc=f"{args.child} {args.workload}", stats=st, **kw)
    wall, cpu = time.monotonic() - t0, cpu_s() - c0
    r = {"wall": wall, "cpu": cpu, "tokens": st["new_tokens"], "seqs": st["sequences"], "rss": rss.peak / 2**20,
         "load": os.getloadavg()[0], "runtime": facts(),
         **quality(texts[: len(evals) if args.workload == "greedy" else None], rows)}
    child_process.report(r)


def spawn(name: str, workload: str, args) -> dict:
    env = dict(os.environ)
    if name == "transformers" or args.candidate_runtime == "plain":
        # today's path: OpenMP's passive waiting (the Makefile forced it before pipeline/core/runtime.py), glibc
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif not args.keep_omp_policy:
        env.pop("OMP_WAIT_POLICY", None)  # the stage chooses it, as `make repro` leaves it to the stage
    cmd = [sys.executable, __file__, "--child", name, "--workload", workload, "--workloads", workload,
           "--candidate-runtime", args.candidate_runtime, *(["--quick"] if args.quick else []),
           *(["--tiny"] if args.tiny else [])]
    return child_process.run(cmd, cwd=ROOT, env=env, label=f"{name} {workload}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the prompts: 48 train, 32 eval")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="4 train prompts, 16 greedy prompts, at most 32 new tokens (bench/quick.py)")
    ap.add_argument("--candidates", default=None, help=f"comma-separated; default {','.join(CANDIDATES)} "
                    f"(--quick: {','.join(QUICK)})")
    ap.add_argument("--backend", default="loop", help="the candidate the last line reports")
    ap.add_argument("--workloads", default="sampling,greedy")
    ap.add_argument("--candidate-runtime", choices=("stage", "plain"), default="stage",
                    help="stage: candidates choose allocator and OpenMP wait policy as the stages do "
                         "(pipeline/core/runtime.py); plain: the baseline's (PASSIVE, glibc)")
    ap.add_argument("--keep-omp-policy", action="store_true", help="pass an OMP_WAIT_POLICY set here to the candidates")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    params, train, evals, extra = read_inputs(args)
    model_dir = ensure_base_model(params)
    g = params.generate
    work = workloads(args, params, train, evals, extra)
    names = (args.candidates or ",".join(QUICK if args.quick else CANDIDATES)).split(",")
    if "transformers" not in names:
        names.insert(0, "transformers")
    for n in names:  # conversions (cached) outside the timed runs
        if n.startswith("ct2"):
            from pipeline.lm import ct2
            ct2.converted(model_dir, {"ct2-fp32": "float32", "ct2-int8": "int8"}[n.partition("@b")[0]],
                          ROOT / params.paths.converted_models)
    load0 = os.getloadavg()
    res: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for w in work:
            for n in names:
                r = spawn(n, w, args)
                res.setdefault((w, n), []).append(r)
                print(f"rep {rep} {w} {n}: {r}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(f"\nSmolLM2-135M ({model_dir.name}), {'quick' if args.quick else 'full'}: {len(train)} train prompts x "
          f"{g.samples_per_prompt} samples, {len(evals) + len(extra)} prompts greedy (eval, IFEval subset, general); medians of "
          f"{args.repeats} interleaved repeats, one process per run; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
          f"{os.cpu_count()} CPUs\n")
    print("| workload | backend | runtime | new tokens | tokens/s (wall) | tokens/CPU-s | CPU s per 1,000 completions | peak RSS MB "
          "| ratio tokens/s | ratio tokens/CPU-s | all constraints pass | mean pass fraction | ratings |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    speed: dict[tuple[str, ...], float] = {}
    for (w, n), rs in res.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "tokens", "seqs", "rss", "all_pass", "mean_pass")}
        tps = statistics.median(x["tokens"] / x["wall"] for x in rs)
        tpc = statistics.median(x["tokens"] / x["cpu"] for x in rs)
        speed[(w, n)], speed[(w, n, "cpu")] = tps, tpc
        b, bc = speed[(w, "transformers")], speed[(w, "transformers", "cpu")]
        rt = rs[-1]["runtime"]
        print(f"| {w} | {n} | {rt['allocator']}, {rt['omp_wait_policy']} | {med['tokens']:.0f} | {tps:.1f} | {tpc:.1f} "
              f"| {1000 * med['cpu'] / med['seqs']:.0f} | {med['rss']:.0f} "
              f"| {tps / b:.2f} | {tpc / bc:.2f} | {med['all_pass']:.3f} | {med['mean_pass']:.3f} | {dict(sorted((int(k), v) for k, v in rs[0]['ratings'].items()))} |")
    print()
    for n in names[1:]:
        r = {w: speed.get((w, n), float("nan")) / speed[(w, "transformers")] for w in work}
        print(f"{n}: tokens/s {' '.join(f'{w} {v:.2f}' for w, v in r.items())}")
    ratio = {w: speed.get((w, args.backend), float("nan")) / speed[(w, "transformers")] for w in work}
    cratio = {w: speed.get((w, args.backend, "cpu"), float("nan")) / speed[(w, "transformers", "cpu")] for w in work}
    print(f"{args.backend} per CPU second: sampling {cratio.get('sampling', float('nan')):.2f} greedy {cratio.get('greedy', float('nan')):.2f}")
    print(f"speedup sampling {ratio.get('sampling', float('nan')):.2f} greedy {ratio.get('greedy', float('nan')):.2f}")


if __name__ == "__main__":
    main()
