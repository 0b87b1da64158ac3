"""Loading causal LMs safely: safetensors only, never remote code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError


def load_causal_lm(path: str | Path, **kwargs: Any):
    """Load a local transformers checkpoint from safetensors; pickle weights are refused."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: model folder does not exist")
    if not any(path.glob("*.safetensors")):
        raise SourceError(f"{path}: no *.safetensors weights (pickle formats are refused for safety)")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
