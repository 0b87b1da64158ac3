"""Shared machinery of the `evaluate` stage: input readers and cached model outputs.

Every model output (greedy generation, summed completion log-prob, per-response KL) goes through
`EvalCache` under a key naming what it depends on (model sha256, prompt hash, decoding params, ...),
and a model is loaded only when some key misses, so a warm cache loads no model at all.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import read_json
from pipeline.core.lineage import sha256_json, sha256_path
from pipeline.core.params import EvaluateParams, GeneralPromptsParams
from pipeline.eval.cache import EvalCache

log = logging.getLogger(__name__)


# Every model is scored in float32, whatever dtype its checkpoint was saved in: the release is saved in
# bfloat16 (train.save_dtype), and the upcast is exact, so evaluate scores exactly the released weights
# with float32 arithmetic, as training ran on CPU. (transformers 5 would load "auto": the config's dtype.)
EVAL_DTYPE = "float32"


class Models:
    """Model folders hashed once and loaded on first use (a warm cache loads nothing).

    `device`, `attn_implementation` and `dtype` (float32 by default, whatever dtype a checkpoint was
    saved in) say where and how models run; they enter every cache key, so they are known before any
    model is loaded, and a loaded model that does not match them is an error rather than a wrong key.
    """

    def __init__(self, loader: Callable[[Path], tuple[Any, Any]] | None = None, *, device: str = "cpu",
                 attn_implementation: str = "sdpa", dtype: str = EVAL_DTYPE):
        self._loader = loader or (lambda folder: _load(folder, attn_implementation, dtype))
        self.device, self.attn_implementation, self.dtype = device, attn_implementation, dtype
        self._sha: dict[Path, str] = {}
        self._loaded: dict[Path, tuple[Any, Any]] = {}
        self._tok: dict[Path, Any] = {}
        self._states: dict[Path, dict] = {}

    def prompt_states(self, folder: Path) -> dict:
        """Keys and values of the prompts the model in `folder` encoded while generating, by prompt token
        ids (filled by `generations`, read by `kls`: the KL pass then encodes only the answers)."""
        return self._states.setdefault(Path(folder).resolve(), {})

    def sha256(self, folder: Path) -> str:
        folder = Path(folder).resolve()
        if folder not in self._sha:
            self._sha[folder] = sha256_path(folder)
        return self._sha[folder]

    def known(self, folder: Path, sha256: str) -> None:
        """Record a folder's sha256 computed elsewhere (the lineage record hashes it already)."""
        self._sha[Path(folder).resolve()] = sha256

    def load(self, folder: Path) -> tuple[Any, Any]:
        folder = Path(folder).resolve()
        if folder not in self._loaded:
            log.info("loading %s", folder)
            model, tok = self._loader(folder)
            self._check_runtime(folder, model)
            self._loaded[folder] = (model, tok)
        return self._loaded[folder]

    def runtime(self, folder: Path) -> dict[str, Any]:
        """Device, dtype and attention kernel the model in `folder` runs with (part of every key)."""
        return {"device": self.device, "dtype": self.dtype, "attn_implementation": self.attn_implementation}

    def _check_runtime(self, folder: Path, model: Any) -> None:
        try:
            param = next(model.parameters())
        except (AttributeError, StopIteration, TypeError):
            return  # a test double without parameters
        have = {"device": param.device.type, "dtype": str(param.dtype).removeprefix("torch.")}
        want = self.runtime(folder)
        if have != {k: want[k] for k in have}:
            raise RuntimeError(f"{folder}: loaded on {have}, but cache keys name {want}")

    def tokenizer(self, folder: Path) -> Any:
        folder = Path(folder).resolve()
        if folder in self._loaded:
            return self._loaded[folder][1]
        if folder not in self._tok:
            from pipeline.lm.loading import load_tokenizer

            self._tok[folder] = load_tokenizer(folder)
        return self._tok[folder]


def _load(folder: Path, attn_implementation: str = "sdpa", dtype: str = "float32") -> tuple[Any, Any]:
    import torch

    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    return (load_causal_lm(folder, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)),
            load_tokenizer(folder))



_CODE: dict[tuple[str, ...], str] = {}


def env_key(models: Models, folder: Path, *modules: str, backend: str | None = None) -> dict[str, Any]:
    """The key parts every cached model output shares: the sha256 of the code that computes it (its
    import closure), the library versions, the generation backend, device, dtype and attention kernel."""
    from pipeline.core.fingerprint import code_part, library_versions

    if modules not in _CODE:
        _CODE[modules] = code_part(*modules)
    return {"code": _CODE[modules], "versions": library_versions("torch", "transformers", "tokenizers"),
            "backend": backend, **models.runtime(folder)}


def _backend_name(fn: Callable[..., Any]) -> str:
    """`module.function` of a generation backend, and the version of its library when it is not ours."""
    from pipeline.core.fingerprint import library_versions

    module = getattr(fn, "__module__", "") or ""
    name = f"{module}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    top = module.split(".")[0]
    if top and top != "pipeline":
        name += f"=={library_versions(top)[top]}"
    return name


# ---------------------------------------------------------------- inputs

def read_test_pairs(path: Path, limit: int | None) -> list[dict]:
    import pandas as pd

    if not path.is_file():
        raise DataError(path, None, "test split exists", "no such file (run `dvc repro build`)")
    df = pd.read_parquet(path)
    missing = {"id", "prompt", "chosen", "rejected"} - set(df.columns)
    if missing:
        raise DataError(path, None, "test split columns", f"missing {sorted(missing)}")
    rows = []
    for i, r in enumerate(df.head(limit).itertuples(index=False)):
        msgs = {k: [dict(m) for m in getattr(r, k)] for k in ("prompt", "chosen", "rejected")}
        for k, v in msgs.items():
            if not v or not all(isinstance(m.get("content"), str) and m.get("role") for m in v):
                raise DataError(path, f"row {i}", k, "must be a non-empty list of {role, content} messages")
        rows.append({"id": str(r.id), **msgs})
    if not rows:
        raise DataError(path, None, "non-empty", "the test split has no rows")
    return rows


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        return first if isinstance(first, str) else first.get("content") if isinstance(first, dict) else None
    return None


def read_general_prompts(path: Path, gp: GeneralPromptsParams) -> list[dict]:
    """[{id, prompt}] from JSONL or a JSON array; `gp.field` holds a string or a list of turns (first used)."""
    from pipeline.core.io import iter_jsonl

    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(path, None, "JSON array of objects", f"got {type(data).__name__}")
        items = list(enumerate(data))  # where = array index, as the ingest convention has it
    else:
        items = list(iter_jsonl(path))
    rows, seen = [], set()
    for where, obj in items:
        if not isinstance(obj, dict) or gp.field not in obj:
            raise DataError(path, where, f"has key {gp.field!r}", f"keys: {sorted(obj) if isinstance(obj, dict) else obj!r:.80}")
        text = _prompt_text(obj[gp.field])
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, where, gp.field, f"must be a non-blank string or a list of turns, got {obj[gp.field]!r:.80}")
        pid = str(obj.get(gp.id_field)) if gp.id_field else f"line{where}"
        if gp.id_field and gp.id_field not in obj:
            raise DataError(path, where, f"has key {gp.id_field!r}", "evaluate.general.id_field names a missing key")
        if pid in seen:
            raise DataError(path, where, "unique id", f"{pid!r} appears twice")
        seen.add(pid)
        rows.append({"id": pid, "prompt": text})
    if not rows:
        raise DataError(path, None, "non-empty", "the general prompt file has no prompts")
    return rows[: gp.max_prompts]


# ---------------------------------------------------------------- cached model outputs

def cached(cache: EvalCache, kind: str, keys: list[dict], compute: Callable[[list[int]], list]) -> list:
    """The value of every key: from the cache, or from `compute(indices)` for the missing ones, each
    distinct key computed once. (A preference test set repeats each completion in several pairs: the
    default's 104 pairs hold 84 distinct prompt-completion items of 208.)"""
    out = [cache.get(kind, k) for k in keys]
    digests = [sha256_json(k) for k in keys]
    first: dict[str, int] = {}
    for i, v in enumerate(out):
        if v is None:
            first.setdefault(digests[i], i)
    if first:
        todo = list(first.values())
        fresh = dict(zip(first, compute(todo), strict=True))
        for i in todo:
            cache.put(kind, keys[i], fresh[digests[i]])
        out = [v if v is not None else fresh[d] for v, d in zip(out, digests, strict=True)]
    return out


def generations(models: Models, folder: Path, convs: list[list[dict]], p: EvaluateParams, cache: EvalCache,
                generate_fn: Callable[..., list[list[str]]], desc: str) -> tuple[list[str], list[bool | None]]:
    """Greedy responses and whether each ended by itself (False: cut at max_new_tokens; None: the
    generation backend did not say), generating only those missing from the cache."""
    decoding = {"do_sample": False, "max_new_tokens": p.generation.max_new_tokens, "batch_size": p.generation.batch_size,
                "precision": p.generation.precision}
    sha = models.sha256(folder)
    env = env_key(models, folder, "pipeline.eval.measures", "pipeline.lm.generation", backend=_backend_name(generate_fn))
    keys = [{"model": sha, "prompt": sha256_json(c), "decoding": decoding, "env": env} for c in convs]

    def compute(todo: list[int]) -> list[dict]:
        model, tok = models.load(folder)
        stats: dict[str, Any] = {}
        keep = ({"prompt_states": models.prompt_states(folder)}
                if "prompt_states" in inspect.signature(generate_fn).parameters else {})
        fresh = generate_fn(model, tok, [convs[i] for i in todo], max_new_tokens=p.generation.max_new_tokens,
                            do_sample=False, batch_size=p.generation.batch_size, seed=0, desc=desc, stats=stats,
                            precision=p.generation.precision, **keep)
        done = stats.get("finished") or [[None]] * len(todo)
        return [{"text": texts[0], "finished": fin[0]} for texts, fin in zip(fresh, done, strict=True)]

    out = cached(cache, "generation", keys, compute)
    return [v["text"] for v in out], [v["finished"] for v in out]


def logps(models: Models, folder: Path, pairs: list[tuple[list[dict], list[dict]]], p: EvaluateParams,
          max_length: int | None, cache: EvalCache, desc: str) -> list[tuple[float, int]]:
    """(summed completion log-prob, completion tokens scored) of (prompt, completion) pairs under the
    model in `folder`; 0 tokens when truncation at `max_length` left none of the completion."""
    from pipeline.lm.scoring import completion_logps, tokenize_completion

    sha = models.sha256(folder)
    env = env_key(models, folder, "pipeline.eval.measures", "pipeline.lm.scoring")
    keys = [{"model": sha, "prompt": sha256_json(pr), "completion": sha256_json(co), "max_length": max_length,
             "batch_size": p.score_batch_size, "env": env} for pr, co in pairs]

    def compute(todo: list[int]) -> list[list]:
        model, tok = models.load(folder)
        items = [tokenize_completion(tok, *pairs[i], max_length=max_length) for i in todo]
        fresh = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=p.score_batch_size, desc=desc)
        return [[v, item.n_completion] for v, item in zip(fresh, items, strict=True)]

    return [tuple(v) for v in cached(cache, "logp", keys, compute)]


def kls(models: Models, policy: Path, base: Path, convs: list[list[dict]], responses: list[str],
        p: EvaluateParams, cache: EvalCache) -> list[tuple[float, int]]:
    from pipeline.lm.scoring import completion_kl, tokenize_completion

    sp, sb = models.sha256(policy), models.sha256(base)
    env = {"policy": env_key(models, policy, "pipeline.eval.measures", "pipeline.lm.scoring"),
           "ref": models.runtime(base)}
    keys = [{"policy": sp, "ref": sb, "prompt": sha256_json(c), "response": sha256_json(r),
             "batch_size": p.score_batch_size, "env": env} for c, r in zip(convs, responses, strict=True)]

    def compute(todo: list[int]) -> list[list]:
        (pm, tok), (bm, _) = models.load(policy), models.load(base)
        items = [tokenize_completion(tok, convs[i], [{"role": "assistant", "content": responses[i]}]) for i in todo]
        states = (models.prompt_states(policy), models.prompt_states(base))
        return [list(v) for v in completion_kl(pm, bm, items, pad_id=tok.pad_token_id, batch_size=p.score_batch_size,
                                               prompt_states=states)]

    return [tuple(v) for v in cached(cache, "kl", keys, compute)]
