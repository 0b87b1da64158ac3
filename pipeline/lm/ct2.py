"""CTranslate2 generation backend: the same contract as `generation.generate()`, on CTranslate2's CPU kernels.

CTranslate2 cannot read a transformers checkpoint directly: `converted()` converts the safetensors
folder once (CTranslate2's own TransformersConverter, quantization int8 or float32) into a cache folder
keyed by sha256 of the source weights and config, the ctranslate2 version, the quantization and the hash
of this module's code; the key and its parts go to lineage. A converted folder is written atomically and
reused on every later call with the same key.

Determinism: CTranslate2 draws samples from a per-worker-thread RNG seeded from the global seed when the
worker first samples. `generate()` therefore sets the seed and builds a fresh `Generator` (one worker) per
call, and hands all prompts to one `generate_batch` (CTranslate2 sorts by length and cuts batches itself),
so the same inputs, params and seed give the same completions. They are not the transformers path's
completions (a different RNG and kernels), and int8 changes the numbers too: quantization is opt-in.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "int8")
KEY_FILE = "CONVERSION.json"


def require() -> Any:
    """Import ctranslate2, or stop with one line naming what to install."""
    try:
        import ctranslate2
    except ImportError:
        raise SourceError("generation backend 'ctranslate2' needs the ctranslate2 package: "
                          "pip install 'ctranslate2~=4.8.5' (or pip install -e '.[fast]')") from None
    return ctranslate2


def conversion_key(model_dir: str | Path, quantization: str) -> dict[str, Any]:
    """Everything the converted folder depends on, and the folder name derived from it."""
    from pipeline.core.imports import code_sha256
    from pipeline.core.lineage import sha256_file, sha256_json

    ct2 = require()
    if quantization not in QUANTIZATIONS:
        raise SourceError(f"ctranslate2 quantization {quantization!r}: allowed {', '.join(QUANTIZATIONS)}")
    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise SourceError(f"{model_dir}: no *.safetensors weights to convert for ctranslate2")
    parts = {"source": {p.name: sha256_file(p) for p in [*weights, model_dir / "config.json"] if p.is_file()},
             "ctranslate2": ct2.__version__, "quantization": quantization,
             "code": code_sha256("pipeline.lm.ct2")}
    return {**parts, "key": sha256_json(parts)}


def converted(model_dir: str | Path, quantization: str, cache_root: str | Path) -> tuple[Path, dict[str, Any]]:
    """The CTranslate2 folder for `model_dir` at `quantization` (converting on a cache miss) and its key record."""
    from pipeline.core.io import atomic_dir, atomic_write_json

    key = conversion_key(model_dir, quantization)
    out = Path(cache_root) / f"ct2-{quantization}-{key['key'][:20]}"
    record_file = out / KEY_FILE
    if record_file.is_file() and json.loads(record_file.read_text(encoding="utf-8")).get("key") == key["key"]:
        return out, {**key, "cache_hit": True, "path": str(out)}
    from ctranslate2.converters import TransformersConverter

    t0 = time.monotonic()
    with atomic_dir(out) as tmp:
        # low_cpu_mem_usage: one copy of the weights; trust_remote_code stays off (the converter's default).
        TransformersConverter(str(model_dir), low_cpu_mem_usage=True).convert(str(tmp), quantization=quantization, force=True)
        atomic_write_json(tmp / KEY_FILE, key)
    log.info("ctranslate2: converted %s (%s) in %.1fs -> %s", model_dir, quantization, time.monotonic() - t0, out)
    return out, {**key, "cache_hit": False, "path": str(out)}


def generate(model_dir: str | Path, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int, seed: int,
             desc: str, quantization: str, cache_root: str | Path, threads: int | None = None,
             stats: dict[str, Any] | None = None) -> list[list[str]]:
    """`num_return_sequences` completions per conversation, in input order (see generation.generate()).

    `batch_size` counts sequences per forward pass, as in the transformers path. `stats` also receives
    `conversion` (the key record of the converted folder).
    """
    from tqdm.auto import tqdm

    from pipeline.lm.generation import available_cpus, check_decoding, eos_ids

    ct2 = require()
    check_decoding(max_new_tokens, batch_size, num_return_sequences, do_sample, temperature, top_p)
    folder, conversion = converted(model_dir, quantization, cache_root)
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tokens = [tokenizer.convert_ids_to_tokens(x) for x in ids]
    eos = eos_ids(model_dir, tokenizer)
    ct2.set_random_seed(seed % (1 << 32))
    # One worker (inter_threads=1) so one RNG stream; its matmuls use every core.
    gen = ct2.Generator(str(folder), device="cpu", compute_type=quantization, inter_threads=1,
                        intra_threads=threads or available_cpus())
    sampling = ({"sampling_topk": 0, "sampling_topp": top_p, "sampling_temperature": temperature} if do_sample
                else {"sampling_topk": 1})
    per_batch = max(1, batch_size // num_return_sequences)
    t0 = time.monotonic()
    bar = tqdm(total=len(texts) * num_return_sequences, desc=desc, unit="seq", dynamic_ncols=True, mininterval=1.0)
    results: list[list[str]] = []
    finished: list[list[bool]] = []
    new_tokens = 0
    try:
        # CTranslate2 sorts the prompts by length and cuts chunks of max_batch_size itself (less padding);
        # results come back in input order, each as soon as its chunk is done.
        pending = gen.generate_batch(tokens, max_batch_size=per_batch, asynchronous=True, max_length=max_new_tokens,
                                     num_hypotheses=num_return_sequences, include_prompt_in_result=False,
                                     end_token=eos, return_end_token=True, **sampling)
        for item in pending:
            res = item.result()
            outs, done = [], []
            for seq in res.sequences_ids:
                stop = bool(seq) and seq[-1] in eos
                new_tokens += len(seq)  # up to and including EOS, as the transformers path counts
                done.append(stop)
                outs.append(tokenizer.decode([t for t in seq if t not in eos], skip_special_tokens=True).strip())
            results.append(outs)
            finished.append(done)
            bar.update(num_return_sequences)
    finally:
        bar.close()
        del gen
    seconds = time.monotonic() - t0
    if stats is not None:
        stats.update(new_tokens=new_tokens, seconds=seconds, sequences=len(texts) * num_return_sequences,
                     tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0, finished=finished, conversion=conversion)
    log.info("%s: %d sequences, %d new tokens in %.1fs (%.0f tokens/s, ctranslate2 %s)", desc,
             len(texts) * num_return_sequences, new_tokens, seconds, new_tokens / max(seconds, 1e-9), quantization)
    return results
