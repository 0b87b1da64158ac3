"""This model's results as the Hub shows them: the card's model-index and the `.eval_results/` files.

Only this model's own measured results go in, each once, under a task, dataset and metric name a reader
knows. Left out: the base model's figures and differences to it (the card's text compares them), the
trivial-answer floor and panel, dev-set numbers (they choose, never report), counts, judge diagnostics,
and a metric that repeats another (`test_ifeval_prompt_strict_valid_policy` is `pass_rate_policy`).
Every dataset is a config of the release's own dataset repo at the release tag: the IFEval figures are on
a subset, named so, never filed under the full benchmark's leaderboard.

`.eval_results/*.yaml` is the Hub's newer format (huggingface_hub `EvalResultEntry`; spec at
https://huggingface.co/docs/hub/eval-results): one file per result. It has no interval field, so the
interval goes in `notes`; the model-index carries it in `metric_args`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.release.manifest import ReleaseInfo

EVAL_RESULTS_DIR = ".eval_results"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class IndexedResult:
    key: str           # metrics/eval.json key
    task_name: str
    config: str        # config of the release dataset repo the prompts or pairs are published as
    dataset_name: str
    metric_type: str   # a Hub metric id where one fits (accuracy); else a plain name
    metric_name: str   # unique over the model-index: the audit matches entries by it


VERIFIABLE = "Verifiable instruction following"
IFEVAL = "Instruction following (IFEval)"
TEST_PROMPTS = "open-release held-out constraint prompts (test)"
SPECS = (
    IndexedResult("pass_rate_policy", VERIFIABLE, "test_prompts", TEST_PROMPTS, "accuracy",
                  "Prompt-level strict accuracy, degenerate answers fail"),
    IndexedResult("test_ifeval_prompt_strict_policy", VERIFIABLE, "test_prompts", TEST_PROMPTS, "accuracy",
                  "Prompt-level strict accuracy, IFEval rules"),
    IndexedResult("constraint_pass_rate_policy", VERIFIABLE, "test_prompts", TEST_PROMPTS, "accuracy",
                  "Instruction-level strict accuracy, degenerate answers fail"),
    IndexedResult("ifeval_prompt_strict_policy", IFEVAL, "ifeval_prompts", "IFEval subset", "accuracy",
                  "IFEval prompt-level strict accuracy"),
    IndexedResult("ifeval_prompt_loose_policy", IFEVAL, "ifeval_prompts", "IFEval subset", "accuracy",
                  "IFEval prompt-level loose accuracy"),
    IndexedResult("ifeval_inst_strict_policy", IFEVAL, "ifeval_prompts", "IFEval subset", "accuracy",
                  "IFEval instruction-level strict accuracy"),
    IndexedResult("ifeval_inst_loose_policy", IFEVAL, "ifeval_prompts", "IFEval subset", "accuracy",
                  "IFEval instruction-level loose accuracy"),
    IndexedResult("pref_accuracy", "Preference ranking", "default", "held-out preference pairs (test split)",
                  "accuracy", "Preference accuracy of the implicit DPO reward (chosen > rejected)"),
    IndexedResult("win_rate", "Judged helpfulness against the base model", "general_prompts", "general prompts",
                  "win_rate", "Judged win rate against the base model (ties count 1/2)"),
    IndexedResult("lc_win_rate", "Judged helpfulness against the base model", "general_prompts", "general prompts",
                  "lc_win_rate", "Length-controlled win rate against the base model (AlpacaEval 2 GLM)"),
)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def indexed(metrics: dict[str, Any] | None) -> list[tuple[IndexedResult, float, tuple[float, float] | None]]:
    """(spec, value, interval or None) for each result that goes to the Hub; judged win rates only when
    the evaluate stage rated its judge reliable."""
    from pipeline.release.gates import JUDGE_METRICS, judge_unreliable

    m = metrics or {}
    skip_judge = judge_unreliable(m)
    out = []
    for spec in SPECS:
        v = m.get(spec.key)
        if not _finite(v) or (skip_judge and spec.key.startswith(JUDGE_METRICS)):
            continue
        lo, hi = m.get(f"{spec.key}_ci_low"), m.get(f"{spec.key}_ci_high")
        out.append((spec, float(v), (float(lo), float(hi)) if _finite(lo) and _finite(hi) else None))
    return out


def _dataset_name(spec: IndexedResult, m: dict[str, Any]) -> str:
    n = {"ifeval_prompts": m.get("n_ifeval_prompts"), "test_prompts": m.get("n_test_prompts")}.get(spec.config)
    return f"{spec.dataset_name}, {n} prompts" if isinstance(n, int) else spec.dataset_name


def model_index_results(metrics: dict[str, Any] | None, info: ReleaseInfo) -> list:
    from huggingface_hub import EvalResult

    out = []
    for spec, v, ci in indexed(metrics):
        args = {"ci_low": ci[0], "ci_high": ci[1], "confidence_level": CONFIDENCE} if ci else None
        out.append(EvalResult(task_type="text-generation", task_name=spec.task_name, metric_type=spec.metric_type,
                              metric_name=spec.metric_name, metric_value=v, metric_args=args,
                              dataset_type=info.dataset_repo, dataset_name=_dataset_name(spec, metrics or {}),
                              dataset_config=spec.config, dataset_split="test", dataset_revision=info.version))
    return out


def eval_result_files(metrics: dict[str, Any] | None, info: ReleaseInfo) -> dict[str, list[dict[str, Any]]]:
    """`.eval_results/<name>.yaml` -> its entries (one each), as `eval_result_entries_to_yaml` writes them."""
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    files = {}
    for spec, v, ci in indexed(metrics):
        notes = [f"{spec.metric_name} (0-1)", f"dataset config {spec.config}, split test, revision {info.version}"]
        if ci:
            notes.append(f"{CONFIDENCE:.0%} CI [{ci[0]:.4f}, {ci[1]:.4f}], bootstrap over prompts")
        entry = EvalResultEntry(dataset_id=info.dataset_repo, task_id=spec.config, value=v, notes="; ".join(notes),
                                source_url=f"{info.endpoint}/{info.model_repo}", source_name="Model card")
        files[f"{spec.key.removesuffix('_policy')}.yaml"] = eval_result_entries_to_yaml([entry])
    return files


def write_eval_results(metrics: dict[str, Any] | None, info: ReleaseInfo, model_dir: Path) -> None:
    import yaml

    from pipeline.core.io import atomic_write_text

    for name, entries in eval_result_files(metrics, info).items():
        atomic_write_text(model_dir / EVAL_RESULTS_DIR / name, yaml.safe_dump(entries, sort_keys=True))


def index_by_name(metrics: dict[str, Any] | None) -> dict[str, float]:
    """metric_name -> value of what the model-index must hold (the audit compares the card with it)."""
    return {spec.metric_name: v for spec, v, _ in indexed(metrics)}
