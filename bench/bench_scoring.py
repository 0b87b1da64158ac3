"""Benchmark: evaluate's teacher-forced phases, the plain forward against the shared-prefix one.

    .venv/bin/python bench/bench_scoring.py [--quick] [--repeats 3] [--base models/base] [--policy models/trained]
    .venv/bin/python bench/bench_scoring.py --tiny   # bench/quick.py: no workspace outputs needed

Three workloads, built from the workspace's real evaluate inputs, as the default `evaluate` runs them:

- `preference`: the test pairs' chosen and rejected completions under the base model
  (outputs/dataset/test.parquet);
- `kl`: KL(policy || base) along the policy's greedy answers to every evaluation prompt
  (outputs/eval/{test,dev,ifeval,general}.parquet, written by the last `evaluate`);
- `judge`: the local judge (the base model) on both orders of each human-labelled pair (paths.judge_labels).

Baseline (ratio 1.00): `plain`, what evaluate did before: every item scored (a completion repeated in
several test pairs once per pair), every row encoded whole, logits at every position (the judge: the last
one), batches by length (the judge: in input order). Candidate: `shared`, the default: each distinct item
once (`pipeline.eval.measures.cached`), completions of one prompt batched on one encoding of it, the
common prefix of a batch (the chat template's system turn, the judge template's head) encoded once, and
logits only at scored positions (`pipeline.lm.scoring.forward_kept`). Runs are interleaved (plain,
shared, ...); the table gives medians of wall and process CPU seconds, and the largest difference between
the two paths' numbers.

`--tiny` (bench/quick.py, a regression check rather than a measurement of evaluate) needs no pipeline
outputs: the base model (built by the base_model stage's run() when absent) is both models, 2 test prompts
with 4 answers each (other prompts' text) make the preference pairs, 8 test prompts with one answer
each the KL items, and 4 human-labelled pairs the judge prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def tiny_inputs(params) -> tuple[list[dict], list[tuple[str, str]]]:
    """Preference pairs and (prompt, answer) items from the repo's data files alone."""
    from itertools import combinations

    from pipeline.constraints.prompts import read_prompts

    texts = [r["prompt"] for r in read_prompts(ROOT / params.paths.test_prompts)][:12]
    user = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    said = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    pairs = [{"prompt": user(texts[k]), "chosen": said(a), "rejected": said(b)}
             for k in range(2) for a, b in combinations(texts[2 + 4 * k: 6 + 4 * k], 2)]
    answers = [(texts[k], texts[(k + 1) % 8]) for k in range(8)]
    return pairs, answers


def workloads(base: Path, policy: Path, limit: int | None, tiny: bool = False):
    import pandas as pd
    import torch

    from pipeline.core.params import load_params
    from pipeline.eval.judge_agreement import read_labeled_pairs
    from pipeline.eval.judges import LocalJudge, template_for
    from pipeline.eval.measures import Models, read_test_pairs
    from pipeline.lm.scoring import completion_kl, completion_logps, forward_kept, tokenize_completion

    params = load_params()
    ev = params.evaluate
    bs = ev.score_batch_size
    models = Models()  # float32, as evaluate scores every model whatever dtype it was saved in
    (base_m, tok), (pol_m, _) = models.load(base), models.load(policy)
    pad = tok.pad_token_id

    tiny_pairs, tiny_answers = tiny_inputs(params) if tiny else (None, None)
    pairs = tiny_pairs or read_test_pairs(ROOT / params.paths.dataset / "test.parquet", limit)
    pref_items = [tokenize_completion(tok, r["prompt"], r[k], max_length=params.train.dpo.get("max_length"))
                  for r in pairs for k in ("chosen", "rejected")]
    distinct = list({tuple(s.ids): s for s in pref_items}.values())

    answered = tiny_answers or [(p, r) for unit in ("test", "dev", "ifeval", "general")
                                for df in [pd.read_parquet(ROOT / params.paths.eval_dir / f"{unit}.parquet")]
                                for p, r in zip(df["prompt"], df["response_policy"], strict=True)]
    kl_items = [tokenize_completion(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": r}])
                for p, r in answered[:limit]]

    template = template_for(ROOT / params.paths.judge_template, ev.judge)
    rows = read_labeled_pairs(ROOT / params.paths.judge_labels)[: 4 if tiny else (limit // 2 if limit else None)]
    prompts = [template.fill(r["instruction"], a, b) for r in rows
               for a, b in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))]
    judge = LocalJudge(ev.judge.local, base, "bench", lambda d: (base_m, tok))

    def judge_plain() -> list[float]:
        """The judge as it ran before: input order, every row whole, the last position's logits."""
        model, _, prefix, cand = judge._load()
        seqs = [list(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, return_dict=True,
                                             add_generation_prompt=True)["input_ids"]) + prefix for t in prompts]
        out = []
        with torch.inference_mode():
            for k in range(0, len(seqs), ev.judge.local.batch_size):
                batch = seqs[k:k + ev.judge.local.batch_size]
                probs = torch.softmax(torch.cat(forward_kept(model, batch, [[len(s) - 1] for s in batch], pad_id=pad,
                                                             share_prefix=False)), -1)
                pa, pb = probs[:, cand[0]].sum(-1), probs[:, cand[1]].sum(-1)
                out += (pa / (pa + pb)).tolist()
        return out

    return {
        "preference": (
            lambda: completion_logps(base_m, pref_items, pad_id=pad, batch_size=bs, share_prefix=False),
            lambda: _spread(pref_items, distinct, completion_logps(base_m, distinct, pad_id=pad, batch_size=bs)),
            f"{len(pref_items)} items ({len(distinct)} distinct)"),
        "kl": (
            lambda: [k for k, _ in completion_kl(pol_m, base_m, kl_items, pad_id=pad, batch_size=bs, share_prefix=False)],
            lambda: [k for k, _ in completion_kl(pol_m, base_m, kl_items, pad_id=pad, batch_size=bs)],
            f"{len(kl_items)} answers"),
        "judge": (judge_plain, lambda: judge.prob_a(prompts), f"{len(prompts)} judge prompts"),
    }


def _spread(items, distinct, values):
    by_ids = {tuple(s.ids): v for s, v in zip(distinct, values, strict=True)}
    return [by_ids[tuple(s.ids)] for s in items]


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the first 24 items of each workload, 1 repeat")
    ap.add_argument("--tiny", action="store_true", help="a workload from the repo's data files alone, 1 repeat (bench/quick.py)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--policy", type=Path, default=ROOT / "models" / "trained")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    import torch

    from pipeline.lm.generation import available_cpus

    torch.set_num_threads(available_cpus())
    repeats = 1 if args.quick or args.tiny else args.repeats
    if args.tiny:
        from bench_generate import ensure_base_model

        from pipeline.core.params import load_params

        args.base = args.policy = ensure_base_model(load_params(ROOT / "params.yaml"))
    work = workloads(args.base, args.policy, 24 if args.quick else None, tiny=args.tiny)
    load0 = os.getloadavg()[0]
    rows = []
    for name, (plain, shared, what) in work.items():
        runs = {"plain": [], "shared": []}
        outs = {}
        for _ in range(repeats):
            for mode, fn in (("plain", plain), ("shared", shared)):
                outs[mode], wall, cpu = timed(fn)
                runs[mode].append((wall, cpu))
        diff = max(abs(a - b) for a, b in zip(outs["plain"], outs["shared"], strict=True))
        med = {m: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for m, r in runs.items()}
        rows.append({"workload": name, "size": what, "plain_wall_s": med["plain"][0], "plain_cpu_s": med["plain"][1],
                     "shared_wall_s": med["shared"][0], "shared_cpu_s": med["shared"][1],
                     "speedup_wall": med["plain"][0] / med["shared"][0], "max_abs_diff": diff})
    print(f"threads {torch.get_num_threads()}, repeats {repeats}, load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    print("| workload | size | plain wall s | plain CPU s | shared wall s | shared CPU s | speed-up (wall) | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['size']} | {r['plain_wall_s']:.1f} | {r['plain_cpu_s']:.1f} | "
              f"{r['shared_wall_s']:.1f} | {r['shared_cpu_s']:.1f} | {r['speedup_wall']:.2f}x | {r['max_abs_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
