"""Batched, seeded sampling from a chat model (used by `generate` and `evaluate`).

`generate()` renders each conversation with the tokenizer's chat template (add_generation_prompt),
sorts prompts by token length so a batch holds prompts of similar length (less left padding, less
wasted compute), pads on the left, and decodes with `pipeline.lm.decode` (the default, `cache` =
"preallocated": shared prefill, preallocated KV cache, finished rows dropped, top-p without a full
sort) or with transformers' `model.generate` (`cache` = "dynamic" or "static"). Every batch re-seeds torch from
(seed, batch index) inside a forked RNG, so a batch's samples do not depend on which batches ran
before it, and the caller's global RNG state is left untouched. A tqdm bar shows sequences done and
the ETA; on CPU all available cores are used. On a shared CPU, set OMP_WAIT_POLICY=PASSIVE before torch
is imported (the `generate` stage does): OpenMP's default spin-waiting is several times slower when
the cores are oversubscribed.

Decoding is exactly what the arguments say: temperature and top_p, with top-k disabled (transformers
would otherwise apply its default top_k=50) and no repetition penalty from the model's defaults.

`generate_vllm()` is an optional path for CUDA machines with vLLM installed (it is not a dependency of
this project and is not exercised by the test suite, which runs on CPU).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def batch_seed(seed: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed for one batch, a pure function of (seed, batch_index)."""
    digest = hashlib.sha256(f"openrelease-generate:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _batch_order(n_batches: int) -> list[int]:
    # The order batches run in; results must not depend on it (tests reverse it).
    return list(range(n_batches))


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in (v if isinstance(v, list) else [v]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _count_new_tokens(new_ids, eos_ids: list[int], pad_id: int | None) -> tuple[int, list[bool]]:
    """Tokens actually generated (up to and including the first EOS; padding after it is free), and
    per sequence whether it stopped by itself (True) or was cut at max_new_tokens (False)."""
    total, finished = 0, []
    stops = set(eos_ids) | ({pad_id} if pad_id is not None else set())
    for row in new_ids.tolist():
        n, done = len(row), False
        for j, t in enumerate(row):
            if t in stops:
                n, done = j + 1, True
                break
        total += n
        finished.append(done)
    return total, finished


def check_decoding(max_new_tokens: int, batch_size: int, num_return_sequences: int, do_sample: bool,
                   temperature: float, top_p: float) -> None:
    if max_new_tokens < 1 or batch_size < 1 or num_return_sequences < 1:
        raise ValueError("max_new_tokens, batch_size and num_return_sequences must be >= 1")
    if not do_sample and num_return_sequences > 1:
        raise ValueError("greedy decoding gives identical sequences; use do_sample=True for several per prompt")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def eos_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """The stop tokens of the checkpoint in `model_dir` (its generation config, then the tokenizer's EOS)."""
    from transformers import GenerationConfig

    try:
        cfg = GenerationConfig.from_pretrained(Path(model_dir))
    except OSError:  # no generation_config.json
        cfg = GenerationConfig()
    return _eos_ids(type("M", (), {"generation_config": cfg})(), tokenizer)


PRECISIONS = ("float32", "bfloat16")


def in_precision(model, precision: str):
    """`model` with its floating-point weights in `precision`: the model itself when they already are,
    else a copy, made once per model and kept on it, so a model that also scores (evaluate) keeps its
    float32 weights. bfloat16 halves the bytes each decoding step reads and runs the matmuls on the
    CPU's bfloat16 instructions (AVX512_BF16, AMX) where it has them; it changes the numbers, so callers
    make it opt-in and record it. RMSNorm and softmax upcast to float32 inside transformers' modules,
    and pipeline.lm.decode samples from float32 logits."""
    import copy

    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = getattr(torch, precision)
    if next(model.parameters()).dtype == dtype:
        return model
    copies = model.__dict__.setdefault("_openrelease_precision_copies", {})
    if precision not in copies:
        copies[precision] = copy.deepcopy(model).to(dtype).eval()
    return copies[precision]


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int,
             seed: int, desc: str, stats: dict[str, Any] | None = None, cache: str = "preallocated",
             precision: str = "float32", prompt_states: dict | None = None) -> list[list[str]]:
    """Sample `num_return_sequences` completions per conversation; returns them in input order.

    `batch_size` counts sequences per forward pass, so each batch holds
    max(1, batch_size // num_return_sequences) prompts. When `stats` is a dict it receives
    `new_tokens`, `seconds`, `sequences`, `tokens_per_s` and `finished` (per prompt, per sequence:
    False when the sequence was cut at max_new_tokens instead of ending with EOS). `cache`: "preallocated"
    decodes with `pipeline.lm.decode`; "dynamic" and "static" call `model.generate` with that
    `cache_implementation` (transformers' own loop, the baseline of bench/bench_generate.py). `precision`:
    "float32" decodes with the model as loaded; "bfloat16" with a bfloat16 copy of it (`in_precision`).
    `prompt_states`, when a dict, receives each prompt's keys and values from the prefill, keyed by the
    prompt's token ids (decoding loop in float32 only: other runs leave it empty), so that evaluate's KL
    pass encodes only the answers (`pipeline.lm.scoring.completion_kl`).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from pipeline.lm.decode import decode

    if cache not in ("preallocated", "dynamic", "static"):
        raise ValueError(f"cache must be preallocated, dynamic or static, got {cache!r}")
    check_decoding(max_new_tokens, batch_size, num_return_sequences, do_sample, temperature, top_p)
    model = in_precision(model, precision)
    device = next(model.parameters()).device
    if device.type == "cpu":
        torch.set_num_threads(available_cpus())
    model.eval()

    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    # Longest first: a memory problem shows in the first batch and the ETA starts pessimistic.
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    per_batch = max(1, batch_size // num_return_sequences)
    batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]

    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                              eos_token_id=eos, pad_token_id=pad_id, repetition_penalty=1.0, **sampling,
                              **({"cache_implementation": cache} if cache == "static" else {}))

    results: list[list[str]] = [[] for _ in texts]
    finished: list[list[bool]] = [[] for _ in texts]
    new_tokens, t0 = 0, time.monotonic()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(texts) * num_return_sequences, desc=desc, unit="seq", dynamic_ncols=True, mininterval=1.0)
    try:
        for bi in _batch_order(len(batches)):
            idx = batches[bi]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            forked = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=forked), torch.inference_mode():
                torch.manual_seed(batch_seed(seed, bi))
                if cache == "preallocated":
                    states = [] if prompt_states is not None and precision == "float32" else None
                    new = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                 eos_ids=eos, pad_id=pad_id, do_sample=do_sample, temperature=temperature,
                                 top_p=top_p, num_return_sequences=num_return_sequences,
                                 prompt_states=states).cpu()
                    for row, mask, st in zip(enc["input_ids"], enc["attention_mask"], states or [], strict=False):
                        prompt_states[tuple(row[mask.bool()].tolist())] = st.cpu()
                else:
                    out = model.generate(**enc, generation_config=config)
                    new = out[:, enc["input_ids"].shape[1]:].cpu()
            n_tokens, done = _count_new_tokens(new, eos, pad_id)
            new_tokens += n_tokens
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            for k, i in enumerate(idx):
                span = slice(k * num_return_sequences, (k + 1) * num_return_sequences)
                results[i] = [s.strip() for s in decoded[span]]
                finished[i] = done[span]
            bar.update(len(idx) * num_return_sequences)
            bar.set_postfix(tok_s=f"{new_tokens / max(time.monotonic() - t0, 1e-9):.0f}", refresh=False)
    finally:
        bar.close()
        tokenizer.padding_side = old_side
    seconds = time.monotonic() - t0
    if stats is not None:
        stats.update(new_tokens=new_tokens, seconds=seconds, sequences=len(texts) * num_return_sequences,
                     tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0, finished=finished)
    log.info("%s: %d sequences, %d new tokens in %.1fs (%.0f tokens/s)", desc, len(texts) * num_return_sequences,
             new_tokens, seconds, new_tokens / max(seconds, 1e-9))
    return results


def vllm_available() -> bool:
    """True when vLLM is importable and a CUDA device is present (the only case `generate_vllm` supports)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(model_path: str, prompts: list[list[dict]], *, max_new_tokens: int, do_sample: bool,
                  temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, seed: int,
                  stats: dict[str, Any] | None = None, dtype: str = "float32") -> list[list[str]]:
    """The same contract as `generate()`, through vLLM (CUDA only; not tested by this project's CPU suite).

    Each prompt gets its own seed derived from (seed, prompt index), so results do not depend on how
    vLLM schedules requests. Token-for-token equality with the transformers path is not expected.
    `dtype` is passed on: vLLM's own "auto" would run a float32 checkpoint in float16.
    """
    from vllm import LLM, SamplingParams  # optional; only reached when vllm_available()

    llm = LLM(model=model_path, seed=seed, trust_remote_code=False, load_format="safetensors", dtype=dtype)
    params = [SamplingParams(n=num_return_sequences, max_tokens=max_new_tokens, seed=batch_seed(seed, i),
                             temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0, top_k=-1)
              for i in range(len(prompts))]
    t0 = time.monotonic()
    outputs = llm.chat(prompts, params, add_generation_prompt=True, use_tqdm=True)
    seconds = time.monotonic() - t0
    results = [[o.text.strip() for o in out.outputs] for out in outputs]
    if stats is not None:
        new_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        stats.update(new_tokens=new_tokens, seconds=seconds, sequences=sum(map(len, results)),
                     tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0,
                     finished=[[o.finish_reason == "stop" for o in out.outputs] for out in outputs])
    return results


def generate_fn(backend: str, *, quantization: str = "float32", cache_root: str | Path | None = None):
    """A function with `generate()`'s signature (model, tokenizer, prompts, **kw) for `backend`:
    "transformers" is `generate` itself; "ctranslate2" runs the model's folder (`model.name_or_path`,
    converted once into `cache_root`) through pipeline.lm.ct2 at `quantization`. For `evaluate`.
    """
    if backend == "transformers":
        return generate
    if backend != "ctranslate2":
        raise ValueError(f"generation backend {backend!r}: use transformers or ctranslate2")
    from pipeline.lm import ct2

    ct2.require()
    if cache_root is None:
        raise ValueError("the ctranslate2 backend needs cache_root (paths.converted_models)")

    def run(model, tokenizer, prompts, **kw):
        folder = Path(getattr(model, "name_or_path", "") or "")
        if not (folder / "config.json").is_file():
            raise ValueError(f"ctranslate2 converts a saved checkpoint; model.name_or_path {str(folder)!r} is not one")
        kw.pop("cache", None)
        if kw.pop("precision", "float32") != "float32":
            raise ValueError("the ctranslate2 backend sets its precision with quantization, not precision")
        return ct2.generate(folder, tokenizer, prompts, quantization=quantization, cache_root=cache_root, **kw)

    return run
