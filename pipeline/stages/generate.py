"""Stage `generate`: sample on-policy completions from the base model for the constraint prompts.

Reads:  `paths.train_prompts` (JSONL `{"id", "prompt", "instruction_id_list", "kwargs"}`, IFEval ids; every row is
        validated, a bad one stops the stage with file:line), the base checkpoint `paths.base_model`,
        params `generate`.
Writes: `paths.generations` (JSONL, one row per completion: `prompt_id`, `prompt_line`, `messages`,
        `instruction_id_list`, `kwargs`, `completion_index`, `text`, `finished` (false: cut at max_new_tokens), `generator`,
        `decoding`), `paths.metrics`/generate.json
        (counts, new tokens, tokens/s, seconds) and `paths.lineage`/generate.json.
Run:    `dvc repro generate` (or `python -m pipeline.stages.generate`).

Each prompt becomes one user turn; the chat template adds the model's default system prompt, exactly
as a user of the released model would see it. Completions are sampled `samples_per_prompt` times per
prompt with the params' temperature/top_p (see pipeline/lm/generation.py for batching and seeding), so
the file is a function of the prompts, the base model and the params.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.constraints.prompts import read_prompts
from pipeline.core.io import atomic_write_json, atomic_write_jsonl
from pipeline.core.params import GenerateParams
from pipeline.core.rounds import ROUND_READS
from pipeline.core.stage import StageContext, stage_main

STAGE = "generate"
READS = ["generate", "paths.train_prompts", "paths.base_model", "paths.generations", "paths.metrics"]
METRICS_FILE = "generate.json"

log = logging.getLogger(__name__)


def generator_name(model_dir: str | Path) -> str:
    """The model's human name from the SOURCE.json that `base_model` writes, else the folder name."""
    source = Path(model_dir) / "SOURCE.json"
    if source.is_file():
        name = json.loads(source.read_text(encoding="utf-8")).get("name")
        if isinstance(name, str) and name.strip():
            return name
    return Path(model_dir).resolve().name


def choose_backend(p: GenerateParams) -> str:
    """The backend `generate.backend` names; a missing library or device is one line naming what to install."""
    import importlib.util

    from pipeline.core.errors import ParamsError
    from pipeline.lm.generation import vllm_available

    if p.backend == "transformers":
        return "transformers"
    if p.backend == "ctranslate2":
        if importlib.util.find_spec("ctranslate2") is None:
            raise ParamsError("generate.backend = 'ctranslate2' needs the ctranslate2 package: "
                              "pip install 'ctranslate2~=4.8.5' (or pip install -e '.[fast]'); or use 'transformers'")
        return "ctranslate2"
    available = vllm_available()
    if p.backend == "vllm" and not available:
        raise ParamsError("generate.backend = 'vllm' needs the vllm package and a CUDA device; use 'auto' or 'transformers'")
    return "vllm" if available else "transformers"


def run(p: GenerateParams, prompts: list[dict], model_dir: str | Path, generator: str | None = None,
        converted_models: str | Path | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Sample completions for `prompts` (rows from read_prompts) with the model in `model_dir`.

    Returns the generation rows (prompt order, then completion index) and the run's statistics.
    """
    from pipeline.lm import generation

    prompts = prompts[: p.max_prompts] if p.max_prompts else prompts
    generator = generator or generator_name(model_dir)
    messages = [[{"role": "user", "content": r["prompt"]}] for r in prompts]
    decoding = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": None,
                "max_new_tokens": p.max_new_tokens, "seed": p.seed}
    kw = dict(max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature, top_p=p.top_p,
              num_return_sequences=p.samples_per_prompt, seed=p.seed)
    stats: dict[str, Any] = {}
    backend = choose_backend(p)
    if backend == "ctranslate2" and p.precision != "float32":
        from pipeline.core.errors import ParamsError

        raise ParamsError(f"generate.precision = {p.precision!r} is for the transformers and vllm backends; "
                          "ctranslate2 takes generate.quantization (float32 or int8)")
    if backend == "vllm":
        texts = generation.generate_vllm(str(model_dir), messages, stats=stats, dtype=p.precision, **kw)
        decoding["precision"] = p.precision
    elif backend == "ctranslate2":
        from pipeline.lm import ct2
        from pipeline.lm.loading import load_tokenizer

        if converted_models is None:
            raise ValueError("the ctranslate2 backend needs converted_models (paths.converted_models)")
        texts = ct2.generate(model_dir, load_tokenizer(model_dir), messages, batch_size=p.batch_size, desc="generate",
                             stats=stats, quantization=p.quantization, cache_root=converted_models, **kw)
        decoding["quantization"] = p.quantization
    else:
        from pipeline.lm.loading import load_causal_lm, load_tokenizer

        model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
        texts = generation.generate(model, tokenizer, messages, batch_size=p.batch_size, desc="generate", stats=stats,
                                    cache=p.cache, precision=p.precision, **kw)
        decoding["cache"] = p.cache
        decoding["precision"] = p.precision
    decoding["backend"] = backend
    rows = []
    finished = stats.pop("finished")
    for r, msgs, outs, done in zip(prompts, messages, texts, finished, strict=True):
        for i, text in enumerate(outs):
            rows.append({"prompt_id": r["id"], "prompt_line": r["line"], "messages": msgs,
                         "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"],
                         "completion_index": i, "text": text, "finished": done[i], "generator": generator,
                         "decoding": decoding})
    stats.update(prompts=len(prompts), completions=len(rows), empty_completions=sum(not r["text"] for r in rows),
                 truncated_completions=sum(not r["finished"] for r in rows))
    return rows, stats


def _body(ctx: StageContext) -> None:
    p = ctx.params.generate
    prompts_path, model_dir = ctx.path("train_prompts"), ctx.path("base_model")
    prompts = read_prompts(prompts_path)
    ctx.add_input(prompts_path, rows=len(prompts), name="train_prompts")
    ctx.add_input(model_dir, log_dataset=False)
    from pipeline.core.rounds import generator_label, template_record_dir
    from pipeline.lm.template import check_template_dir

    # a later DPO round samples with the previous round's policy: its template must still be the base model's
    ctx.record.extra["chat_template_sha256"] = check_template_dir(model_dir, template_record_dir(ctx), "generate")
    rows, stats = run(p, prompts, model_dir, generator=generator_label(ctx),  # None: the folder's own name
                      converted_models=ctx.path("converted_models"))
    conversion = stats.pop("conversion", None)
    dec = rows[0]["decoding"] if rows else {}
    ctx.record.extra["generation_backend"] = {"backend": dec.get("backend", "none"),
                                              "quantization": (dec.get("quantization") or dec.get("precision", "float32")
                                                               if rows else None),
                                              "conversion": conversion}
    out = ctx.path("generations")
    atomic_write_jsonl(out, rows)
    ctx.add_output(out, rows=len(rows))
    metrics = {"prompts": stats["prompts"], "completions": stats["completions"],
               "empty_completions": stats["empty_completions"], "truncated_completions": stats["truncated_completions"],
               "new_tokens": stats["new_tokens"]}
    metrics_file = ctx.path("metrics") / METRICS_FILE
    atomic_write_json(metrics_file, metrics)
    ctx.add_output(metrics_file)
    ctx.log_metrics(metrics)
    # speed differs from run to run: MLflow and the run record, not the DVC metrics file
    ctx.log_run_metrics({"tokens_per_s": round(stats["tokens_per_s"], 2), "generation_s": round(stats["seconds"], 2)})
    ctx.run.set_tags({"generate.backend": rows[0]["decoding"]["backend"] if rows else "none",
                      "generate.generator": rows[0]["generator"] if rows else "none"})
    log.info("generate: %d completions for %d prompts, %.0f new tokens/s", len(rows), stats["prompts"], stats["tokens_per_s"])


# Round k >= 2 of iterative DPO (pipeline.core.rounds): the dvc.yaml foreach stage generate_round@<rk> runs this
# module with `--round rk`, the same body on the round's paths.
DVC_STAGES = {STAGE: READS, "generate_round": [*READS, *ROUND_READS]}


def main() -> None:
    from pipeline.core.rounds import reads, round_arg, wrap

    if name := round_arg():
        stage_main(f"{STAGE}.{name}", reads(READS, name), wrap(name, STAGE, _body))
        return
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    from pipeline.core.runtime import tune

    tune()  # allocator and OpenMP wait policy, before torch is imported
    main()
