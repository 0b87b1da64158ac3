"""A small but complete set of release inputs, as the stages before `card` would leave them.

A git repo (tagged v0.1.0) holding the real params.yaml, a fake dvc.lock, a source file and the
evaluation prompts; beside it, untracked like the real outputs: the tiny model as the trained model
(with TRL's README and a LoRA adapter folder), Parquet splits in the dataset contract, metrics, a plot,
validation and decontamination reports, and lineage records made with the real LineageRecord whose
inputs and outputs chain together by sha256. No pipeline stage runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.lineage import Artifact, LineageRecord
from pipeline.core.params import load_params

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test", "-c", "commit.gpgsign=false",
       "-c", "tag.gpgsign=false"]
VERSION = "v0.1.0"
EVAL = {"pref_accuracy": 0.6875, "reward_margin": 0.4213, "pass_rate_base": 0.1944, "pass_rate_policy": 0.3611,
        "pass_rate_delta": 0.1667, "pass_rate_delta_ci_low": 0.0278, "pass_rate_delta_ci_high": 0.3056,
        "win_rate": 0.5417, "lc_win_rate": 0.5102, "length_ratio": 1.12, "kl": 0.0831, "n_test_prompts": 36,
        "judge_order_consistency": 0.75, "pass_rate_floor": 0.0556}  # the floor: gate trivial-floor needs it
SOURCES = [{"name": "on_policy", "format": "ultrafeedback", "path": "data/sources/rated.jsonl", "license": "Apache-2.0"},
           {"name": "hh", "format": "hh-rlhf", "path": "data/sources/hh.jsonl", "license": "MIT"}]
EVAL_PROMPTS = [
    "Write a short poem about the sea in all lowercase letters and end it with the phrase 'that is all'.",
    "List three benefits of regular exercise as exactly three markdown bullet points without using commas.",
]
TRAIN_PROMPTS = [
    "Describe your favourite season in exactly two sentences without using any commas at all please.",
    "Give a title in double angle brackets and then explain how rainbows form in under fifty words.",
    "Answer in valid JSON with keys name and reason: which planet would you visit first and why?",
    "Write four bullet points about tea, all in lowercase, and finish with the exact phrase any questions.",
]


def git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def _pair(i: int, prompt: str, split: str) -> dict:
    return {"id": f"{split}-{i}", "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": f"a good answer {i}"}],
            "rejected": [{"role": "assistant", "content": f"A Bad, Answer {i}"}],
            "chosen_cut": False, "rejected_cut": i % 2 == 0,
            "score_chosen": 1.0, "score_rejected": 0.25, "source": "on_policy", "source_row": f"rated.jsonl:{i + 1}",
            "rule": "best_vs_worst", "prompt_hash": f"{i:064x}"}


def _eval_row(i: int, prompt: str) -> dict:
    """A row of evaluate's per-prompt table (pipeline.eval.verifiable.set_table), both models."""
    row = {"id": f"e{i}", "prompt": prompt, "instruction_id_list": '["punctuation:no_comma"]', "kwargs": "[{}]"}
    for who, text, ok in (("base", "a, b", False), ("policy", f"an answer without commas {i}", True)):
        row.update({f"response_{who}": text, f"finished_{who}": True, f"valid_{who}": True, f"failed_{who}": "",
                    f"follow_strict_{who}": json.dumps([ok]), f"strict_{who}": ok, f"pass_{who}": ok})
    return {**row, "kl": 0.1}


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=40)
    ax.plot([0, 1, 2, 3], [0.69, 0.6, 0.5, 0.45])
    ax.set_title("loss")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _record(root: Path, stage: str, params: dict, inputs: list, outputs: list, run: str, commit: str,
            extra: dict | None = None) -> None:
    rec = LineageRecord(stage=stage, params=params, params_digest=f"{abs(hash(stage)):016x}" * 4,
                        inputs=[Artifact.of(root / p, rows=r, root=root) for p, r in inputs],
                        outputs=[Artifact.of(root / p, rows=r, root=root) for p, r in outputs],
                        extra={"metrics": {}, **(extra or {})})
    out = root / "lineage" / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec.to_dict(), indent=2, sort_keys=True))
    from pipeline.core.runs import write_run_record  # the volatile facts, outside DVC's hashes

    write_run_record(root / ".openrelease" / "runs", stage, out, {
        "git": {"commit": commit, "dirty": True}, "finished_at": "2025-01-01T00:00:00+00:00",
        "mlflow": {"run_id": f"{run:0>32}", "parent_run_id": "f" * 32, "experiment_id": "1",
                   "tracking_uri": "sqlite:///mlflow.db"}, "metrics": {"wall_time_s": 12.5}})


def make_release_project(dest: Path, tiny_model_dir: Path, *, sources: list[dict] | None = None,
                         train_prompts: list[str] | None = None, dvc: bool = True) -> Path:
    """Build the project under `dest` and return it (a clean git tree tagged v0.1.0)."""
    import torch
    from safetensors.torch import save_file

    root = dest
    root.mkdir(parents=True, exist_ok=True)
    sources = SOURCES if sources is None else sources
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    (root / "README.md").write_text("# test project\n")
    p = load_params(root / "params.yaml").paths
    # Tracked inputs: the sources and the evaluation prompts.
    for s in sources:
        f = root / s["path"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"instruction": "hello", "completions": []}) + "\n")
    for rel, prompts in ((p.test_prompts, EVAL_PROMPTS), (p.general_prompts, ["What is the capital of France?"])):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps({"id": f"e{i}", "prompt": t, "constraints": []}) + "\n"
                             for i, t in enumerate(prompts)))
    # Outputs (git-ignored, as DVC leaves them).
    base = root / p.base_model
    base.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", base / "config.json")
    (root / p.ingested).mkdir(parents=True)
    (root / p.ingested / "rows.jsonl").write_text('{"id": "r1"}\n')
    (root / p.validated).mkdir(parents=True)
    (root / p.validated / "summary.json").write_text('{"kept": 6}\n')
    prompts = train_prompts or TRAIN_PROMPTS
    write_parquet(root / p.dataset / "train.parquet", [_pair(i, t, "train") for i, t in enumerate(prompts)])
    write_parquet(root / p.dataset / "test.parquet", [_pair(9, "Say hello in French, lowercase only.", "test")])
    # build also writes a per-pair provenance side table; it sorts before the splits
    write_parquet(root / p.dataset / "provenance.parquet",
                  [{"id": f"p{i}", "source": "on-policy", "split": "train", "seed": 42} for i in range(len(prompts))])
    write_parquet(root / p.eval_dir / "test.parquet", [_eval_row(i, t) for i, t in enumerate(EVAL_PROMPTS)])
    model = root / p.model
    shutil.copytree(tiny_model_dir, model)
    from pipeline.lm.portable import make_portable

    make_portable(model)   # as the train stage leaves it: loadable by transformers 4.x too
    (model / "README.md").write_text("---\nlibrary_name: transformers\n---\n# Model Card for Model ID\n(TRL template)\n")
    (model / "adapter").mkdir()
    (model / "adapter" / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA"}\n')
    save_file({"lora_A": torch.zeros(4, 8)}, str(model / "adapter" / "adapter_model.safetensors"))
    (model / "adapter" / "README.md").write_text("# PEFT template card\n")
    metrics = root / p.metrics
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "eval.json").write_text(json.dumps(EVAL, indent=2))
    (metrics / "data.json").write_text(json.dumps({"read": 10, "quarantined": 1, "validated": 9,
                                                   "filtered.decontaminated": 1, "pairs_train": 4, "pairs_test": 1,
                                                   "prompts_train": 4, "prompts_test": 1, "groups_binarized": 8,
                                                   "filtered.no_pair": 3, "binarize.tie": 5, "cut.chosen_train": 0,
                                                   "cut.rejected_train": 2, "cut.unknown_train": 0,
                                                   "cut.chosen_test": 0, "cut.rejected_test": 0, "cut.unknown_test": 0}))
    (metrics / "generate.json").write_text(json.dumps({"prompts": 10, "completions": 60, "truncated_completions": 21}))
    (metrics / "rate.json").write_text(json.dumps({"prompts": 10, "completions": 60, "contrastive_prompts": 5,
                                                   "degenerate_completions": 4}))
    (metrics / "train.json").write_text(json.dumps({"train_loss": 0.52, "effective_batch_size": 8,
                                                    "wall_time_s": 301.2}))
    _png(root / p.plots / "train" / "loss.png")
    reports = root / p.reports
    (reports / "validation").mkdir(parents=True)
    (reports / "validation" / "report.json").write_text(json.dumps({"status": "passed", "input_rows": 10, "kept": 9,
                                                                    "quarantined": 1}))
    (reports / "decontamination.json").write_text(json.dumps({"ngram": 13, "removed": 1,
                                                              "sets": {"test_prompts": {"removed": 1}}}))
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "build": {"cmd": "python -m pipeline.stages.build", "deps": [{"path": p.validated, "md5": "a" * 32 + ".dir"}],
                  "outs": [{"path": p.dataset, "md5": "b" * 32 + ".dir"}]},
        "train": {"cmd": "python -m pipeline.stages.train", "params": {"params.yaml": {"train.seed": 1}},
                  "deps": [{"path": p.dataset, "md5": "b" * 32 + ".dir"}],
                  "outs": [{"path": p.model, "md5": "c" * 32 + ".dir"}]}}}))
    git(root, "init", "-q", "-b", "main")
    if dvc:  # a DVC repo without stages: `dvc status` is clean, as after a committed `dvc repro`
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, capture_output=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    git(root, "add", "-A")
    git(root, "commit", "-qm", "release inputs")
    commit = git(root, "rev-parse", "HEAD")
    params = load_params(root / "params.yaml")
    bm = params.section_dump("base_model")
    _record(root, "base_model", {"base_model": bm}, [(str(tiny_model_dir / "config.json"), None)], [(p.base_model, None)],
            "1", commit)
    _record(root, "ingest", {"data": {"sources": sources}}, [(s["path"], 1) for s in sources], [(p.ingested, 10)],
            "2", commit)
    _record(root, "validate", {}, [(p.ingested, 10)], [(p.validated, 9)], "3", commit)
    _record(root, "generate", {"generate": params.section_dump("generate")}, [(p.test_prompts, 2)],
            [(f"{p.metrics}/generate.json", None)], "7", commit)
    _record(root, "rate", {"rate": params.section_dump("rate"), "validity": params.section_dump("validity")},
            [(f"{p.metrics}/generate.json", None)], [(f"{p.metrics}/rate.json", None)], "8", commit)
    _record(root, "build", {"build": params.section_dump("build")}, [(p.validated, 9), (p.test_prompts, 2)],
            [(p.dataset, 5)], "4", commit)
    _record(root, "train", {"train": {"dpo": {"beta": 0.1, "learning_rate": 2e-4, "seed": 42}, "global_batch_size": 8}},
            [(p.base_model, None), (f"{p.dataset}/train.parquet", 4)], [(p.model, None)], "5", commit,
            extra={"train": {"plan": {"device": "cpu", "precision": "fp32", "packing": True}}})
    _record(root, "evaluate", {"evaluate": {"judge": {"kind": "local", "model": "models/base"}}},
            [(p.model, None), (f"{p.dataset}/test.parquet", 1), (p.test_prompts, 2)], [(f"{p.metrics}/eval.json", None)],
            "6", commit)
    git(root, "tag", VERSION)
    return root
