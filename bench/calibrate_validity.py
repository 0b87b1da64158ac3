"""How often each degeneration rule (params.yaml `validity`) flags real text: the calibration table.

Human-written answers, which a good rule should almost never flag (their flag rate is the rule's
false-positive rate), beside the base model's own answers:
- hh-rlhf harmless-base test, the chosen transcript's last assistant turn, its prompt the last human
  turn (`../shared/data/hh-rlhf/harmless-base_test.jsonl.gz`, MIT);
- LLaMA-Factory's dpo_en_demo, the chosen reply to the last human turn (`../shared/data/llama-factory`,
  Apache-2.0);
- the base model's greedy evaluation answers (`paths.eval_dir`'s Parquet files: the test, dev,
  IFEval-subset and general prompt sets) and its sampled training completions (`paths.generations`),
  with the generator's own `finished` flag.

Human answers carry no `finished` flag, so the `unfinished` rule judges them by their last character,
as `openrelease score` does for a file without `finished`. Reuse is measured within each set, as
evaluate measures it within each prompt set (a larger set has more chances of a shared stock phrase).

Run: `python bench/calibrate_validity.py [--params params.yaml] [--sweep]`; `--sweep` adds each
threshold's flag rate at neighbouring values. Prints Markdown tables (docs/evaluation.md: "Degenerate answers").
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.constraints.validity import RULES, Rules, assess, rule_rates  # noqa: E402
from pipeline.data.formats.hh_rlhf import parse_transcript  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def human_sets() -> dict[str, tuple[list[str], list[str]]]:
    sets: dict[str, tuple[list[str], list[str]]] = {}
    hh = SHARED / "hh-rlhf" / "harmless-base_test.jsonl.gz"
    if hh.is_file():
        prompts, answers = [], []
        with gzip.open(hh, "rt", encoding="utf-8") as f:
            for line in f:
                msgs = parse_transcript(json.loads(line)["chosen"])
                if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
                    prompts.append(msgs[-2]["content"])
                    answers.append(msgs[-1]["content"])
        sets["human: hh-rlhf chosen"] = (prompts, answers)
    lf = SHARED / "llama-factory" / "dpo_en_demo.json"
    if lf.is_file():
        rows = json.loads(lf.read_text(encoding="utf-8"))
        sets["human: llama-factory chosen"] = ([r["conversations"][-1]["value"] for r in rows],
                                               [r["chosen"]["value"] for r in rows])
    return sets


def model_sets(params: dict) -> dict[str, tuple[list[str], list[str], list]]:
    import pandas as pd

    out: dict[str, tuple[list[str], list[str], list]] = {}
    eval_dir = ROOT / params["paths"]["eval_dir"]
    for pq in sorted(eval_dir.glob("*.parquet")):
        df = pd.read_parquet(pq)
        if "response_base" not in df.columns or "prompt" not in df.columns:
            continue
        fin = list(df["finished_base"]) if "finished_base" in df.columns else [None] * len(df)
        out[f"base greedy: {pq.stem}"] = (list(df["prompt"]), list(df["response_base"]), fin)
    gen = ROOT / params["paths"]["generations"]
    if gen.is_file():
        rows = [json.loads(x) for x in gen.read_text(encoding="utf-8").splitlines() if x.strip()]
        out["base samples: generations"] = ([r["messages"][-1]["content"] for r in rows], [r["text"] for r in rows],
                                            [r.get("finished") for r in rows], [r["prompt_id"] for r in rows])
    return out


def table(rules: Rules, sets: dict) -> list[str]:
    head = ["set", "n", *RULES, "any rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, data in sets.items():
        prompts, answers = data[0], data[1]
        fin = data[2] if len(data) > 2 else None
        groups = data[3] if len(data) > 3 else None
        rates = rule_rates(assess(prompts, answers, fin, rules, groups))
        cells = [f"{100 * rates[r]:.1f}%" for r in RULES]
        lines.append(f"| {name} | {len(answers)} | " + " | ".join(cells) + f" | {100 * rates['degenerate']:.1f}% |")
    return lines


SWEEP = {"min_words": [1, 2, 3, 5], "max_repetition": [0.2, 0.3, 0.4, 0.5], "max_sentence_repeats": [2, 3, 4],
         "max_prompt_copy": [0.4, 0.5, 0.6, 0.8], "reuse_similarity": [0.8, 0.9, 0.95]}


def main() -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--sweep", action="store_true", help="flag rates at neighbouring thresholds too")
    args = ap.parse_args()
    params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    rules = Rules.of(params.get("validity"))
    sets = {**human_sets(), **model_sets(params)}
    if not sets:
        print("no data: ../shared/data and the pipeline outputs are both absent", file=sys.stderr)
        return 1
    print(f"rules: {rules}\n")
    print("\n".join(table(rules, sets)))
    if args.sweep:
        for key, values in SWEEP.items():
            print(f"\n### {key}")
            for v in values:
                print(f"\n{key} = {v}")
                print("\n".join(table(Rules(**{**rules.__dict__, key: v}), sets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
