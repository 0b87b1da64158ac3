"""The ctranslate2 generation backend on the tiny model: cached hashed conversion, determinism, selection."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("ctranslate2")

from pipeline.lm import ct2  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Write a long and detailed story about a lighthouse keeper and a storm."}],
    [{"role": "user", "content": "List three fruits."}],
]
KW = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=2, batch_size=4,
          desc="test", threads=1)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from pipeline.lm.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_conversion_is_cached_by_key(tiny_model_dir, tmp_path):
    out, rec = ct2.converted(tiny_model_dir, "int8", tmp_path)
    assert not rec["cache_hit"] and (out / "model.bin").is_file()
    assert json.loads((out / ct2.KEY_FILE).read_text())["key"] == rec["key"]
    again, rec2 = ct2.converted(tiny_model_dir, "int8", tmp_path)
    assert again == out and rec2["cache_hit"]
    # Every part of the key changes it: quantization, weights, converter version, code.
    assert ct2.conversion_key(tiny_model_dir, "float32")["key"] != rec["key"]
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("1024", "1025"))
    assert ct2.conversion_key(changed, "int8")["key"] != rec["key"]


def test_key_names_library_and_code(tiny_model_dir, monkeypatch):
    import ctranslate2

    import pipeline.core.imports as imports

    base = ct2.conversion_key(tiny_model_dir, "int8")["key"]
    monkeypatch.setattr(ctranslate2, "__version__", "0.0.0")
    assert ct2.conversion_key(tiny_model_dir, "int8")["key"] != base
    monkeypatch.undo()
    monkeypatch.setattr(imports, "code_sha256", lambda *m, **k: "other")
    assert ct2.conversion_key(tiny_model_dir, "int8")["key"] != base


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_same_seed_same_completions(tiny_model_dir, tok, tmp_path, quantization):
    runs = []
    for _ in range(2):
        stats: dict = {}
        runs.append(ct2.generate(tiny_model_dir, tok, PROMPTS, seed=3, quantization=quantization, cache_root=tmp_path,
                                 stats=stats, **KW))
    assert runs[0] == runs[1]
    assert [len(x) for x in runs[0]] == [2, 2, 2]
    assert len(stats["finished"]) == 3 and 0 < stats["new_tokens"] <= 3 * 2 * 6
    other = ct2.generate(tiny_model_dir, tok, PROMPTS, seed=4, quantization=quantization, cache_root=tmp_path, **KW)
    assert other != runs[0]  # random weights: a different seed samples different tokens


def test_greedy_is_deterministic(tiny_model_dir, tok, tmp_path):
    kw = dict(max_new_tokens=6, do_sample=False, batch_size=2, desc="g", seed=0, threads=1)
    a = ct2.generate(tiny_model_dir, tok, PROMPTS, quantization="float32", cache_root=tmp_path, **kw)
    b = ct2.generate(tiny_model_dir, tok, PROMPTS[::-1], quantization="float32", cache_root=tmp_path, **kw)
    assert a == b[::-1] and all(len(x) == 1 for x in a)


def test_missing_library_names_the_package(monkeypatch):
    import builtins

    from pipeline.core.errors import SourceError

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "ctranslate2":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(SourceError, match="needs the ctranslate2 package: pip install 'ctranslate2"):
        ct2.require()


def test_stage_selects_ctranslate2_and_records_quantization(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from pipeline.core.errors import ParamsError
    from pipeline.core.params import load_params
    from pipeline.stages import generate

    p = load_params("params.yaml").generate.model_copy(update={"backend": "ctranslate2", "quantization": "int8",
                                                               "samples_per_prompt": 2, "max_new_tokens": 4})
    prompts = [{"id": "p1", "line": 1, "prompt": "Say hi.", "instruction_id_list": ["change_case:english_lowercase"],
                "kwargs": [{}]}]
    rows, stats = generate.run(p, prompts, tiny_model_dir, converted_models=tmp_path)
    assert rows[0]["decoding"]["backend"] == "ctranslate2" and rows[0]["decoding"]["quantization"] == "int8"
    assert stats["conversion"]["quantization"] == "int8"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ParamsError, match="needs the ctranslate2 package"):
        generate.choose_backend(p)


def test_generate_fn_for_evaluate(tiny_model_dir, tok, tmp_path):
    from pipeline.lm import generation
    from pipeline.lm.loading import load_causal_lm

    assert generation.generate_fn("transformers") is generation.generate
    fn = generation.generate_fn("ctranslate2", quantization="float32", cache_root=tmp_path)
    model = load_causal_lm(tiny_model_dir)
    kw = dict(max_new_tokens=4, do_sample=False, batch_size=2, seed=0, desc="e")
    got = fn(model, tok, PROMPTS, **kw)
    assert got == ct2.generate(tiny_model_dir, tok, PROMPTS, quantization="float32", cache_root=tmp_path, **kw)
    with pytest.raises(ValueError, match="use transformers or ctranslate2"):
        generation.generate_fn("onnx")


def test_card_names_backend_and_precision():
    from types import SimpleNamespace

    from pipeline.release.cards import _generation_backend_lines

    rec = {"generate": {"extra": {"generation_backend": {"backend": "ctranslate2", "quantization": "int8",
                                                         "conversion": {"key": "ab" * 32, "ctranslate2": "4.8.5"}}}}}
    text = "\n".join(_generation_backend_lines(SimpleNamespace(lineage=rec)))
    assert "ctranslate2 backend, weights in int8" in text and "`abababababab`" in text
    assert _generation_backend_lines(SimpleNamespace(lineage={})) == []
