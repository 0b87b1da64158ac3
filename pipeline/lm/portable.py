"""Checkpoint files that load the same under transformers 4.x and 5.x.

transformers 5 writes config.json with `rope_parameters` only and tokenizer_config.json with
`tokenizer_class: TokenizersBackend`. transformers 4.57.1 ignores the first (so a Llama model loads with
its default rope_theta 10000.0: SmolLM2 needs 100000.0, and answers differently, without a warning) and
cannot import the second. `make_portable` adds the legacy keys 4.x reads beside the 5.x ones, which 5.x
also accepts (it folds `rope_theta`/`rope_scaling` into `rope_parameters`, `torch_dtype` into `dtype`).
tests/test_release_tf4.py loads the result with 4.57.1 and compares greedy answers with 5.x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.io import (
    atomic_write_json,
    config_dtype_name,  # noqa: F401 (re-exported; it lives in core so release can read it)
    read_json,
)

# What `train.save_dtype` may name, and the torch dtype each means.
SAVE_DTYPES = ("float32", "bfloat16", "float16")
# A 5.x tokenizer class name 4.x does not have; with a tokenizer.json, the fast GPT-2 class loads the same
# byte-level BPE in 4.x (SmolLM2's own repo names it), and 5.x maps that name to its tokenizers backend.
_TF5_ONLY_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}
PORTABLE_TOKENIZER_CLASS = "GPT2TokenizerFast"
# tokenizer_config keys 5.x writes that describe this machine's load, not the tokenizer.
_LOAD_FACTS = ("is_local", "local_files_only", "backend")


def portable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with the 4.x spelling of the rope and dtype fields added (5.x's kept)."""
    out = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        # 4.x: rope_scaling null means plain RoPE; any other type carries its own fields
        out["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
    if cfg.get("dtype") and "torch_dtype" not in cfg:
        out["torch_dtype"] = cfg["dtype"]
    return out


def portable_tokenizer_config(cfg: dict[str, Any], has_tokenizer_json: bool) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in _LOAD_FACTS}
    if has_tokenizer_json and out.get("tokenizer_class") in _TF5_ONLY_TOKENIZERS | {None}:
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    return out


def make_portable(folder: Path) -> None:
    """Rewrite config.json and tokenizer_config.json in `folder` (in place) as `portable_*` says."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        atomic_write_json(folder / "config.json", portable_config(read_json(folder / "config.json")))
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        atomic_write_json(tc, portable_tokenizer_config(read_json(tc), (folder / "tokenizer.json").is_file()))


def resolve_save_dtype(save_dtype: str, base_dir: Path) -> str:
    """`train.save_dtype` made concrete: "base" is the dtype the base model was published in (SOURCE.json
    `original_dtype`, written by the base_model stage), float32 when that is unknown."""
    if save_dtype != "base":
        return save_dtype
    source = base_dir / "SOURCE.json"
    dtype = (read_json(source) if source.is_file() else {}).get("original_dtype")
    if dtype is None and not source.is_file() and (base_dir / "config.json").is_file():
        # a trained model (a later DPO round starts from the previous round's): it was saved in the base's dtype
        dtype = config_dtype_name(read_json(base_dir / "config.json"))
    return dtype if dtype in SAVE_DTYPES else "float32"




def name_hub_base(adapter_config: Path, base_dir: Path) -> None:
    """Point a PEFT adapter_config.json at the base model's Hub repo and pinned revision (SOURCE.json `hub`,
    from params base_model.hub), so `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds the base
    anywhere, not a folder of this machine. Left as it is when the base has no Hub id."""
    source = base_dir / "SOURCE.json"
    hub = (read_json(source) if source.is_file() else {}).get("hub") or {}
    if not adapter_config.is_file() or not hub.get("repo_id"):
        return
    cfg = read_json(adapter_config)
    cfg["base_model_name_or_path"], cfg["revision"] = hub["repo_id"], hub.get("revision")
    atomic_write_json(adapter_config, cfg)
