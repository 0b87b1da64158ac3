"""Batched sampling on the tiny model: determinism, batch-order independence, padding, progress."""

from __future__ import annotations

import pytest

from pipeline.lm import generation
from pipeline.lm.generation import batch_seed, generate

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Write a long and detailed story about a lighthouse keeper and a storm."}],
    [{"role": "user", "content": "List three fruits."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is rain?"}],
    [{"role": "user", "content": "Explain tides in two sentences, please, for a child."}],
]
KW = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=2, batch_size=4, desc="test")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tests share two cores with other work; two spinning OpenMP threads on a loaded machine made these
    tiny generations ~10x slower. Thread use itself is checked in test_uses_every_available_cpu.
    Module scope, so the module-scoped `ref` decodes with the same thread count as the tests: the thread
    count can change the last bits of a matmul, and so a sampled token."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "available_cpus", lambda: 1)
        yield


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def ref(tiny):
    model, tok = tiny
    return generate(model, tok, PROMPTS, seed=1, **KW)


def test_shape_and_determinism(tiny, ref):
    model, tok = tiny
    assert [len(x) for x in ref] == [2] * len(PROMPTS)
    assert all(isinstance(s, str) for x in ref for s in x)
    assert any(x[0] != x[1] for x in ref)  # sampling gives different sequences per prompt
    assert generate(model, tok, PROMPTS, seed=1, **KW) == ref


def test_batch_order_and_global_rng_do_not_matter_but_seed_does(tiny, ref, monkeypatch):
    import torch

    model, tok = tiny
    torch.manual_seed(12345)
    torch.rand(10)
    monkeypatch.setattr(generation, "_batch_order", lambda n: list(reversed(range(n))))
    state = torch.get_rng_state()
    assert generate(model, tok, PROMPTS, seed=1, **KW) == ref
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert generate(model, tok, PROMPTS, seed=2, **KW) != ref


def test_padding_side_restored(tiny):
    model, tok = tiny
    tok.padding_side = "right"
    generate(model, tok, PROMPTS[:1], seed=0, **{**KW, "max_new_tokens": 2})
    assert tok.padding_side == "right"


def test_results_follow_input_order(tiny):
    """Greedy output per prompt is the same whether the prompt is alone or in a left-padded batch."""
    model, tok = tiny
    kw = dict(max_new_tokens=6, do_sample=False, batch_size=8, seed=0, desc="greedy")
    together = generate(model, tok, PROMPTS, **kw)
    alone = [generate(model, tok, [p], **kw)[0] for p in PROMPTS]
    assert together == alone


def test_progress_bar_and_stats(tiny, capsys):
    model, tok = tiny
    stats: dict = {}
    generate(model, tok, PROMPTS[:3], seed=0, stats=stats, **{**KW, "desc": "sampling-xyz"})
    err = capsys.readouterr().err
    assert "sampling-xyz" in err and "6/6" in err
    assert stats["sequences"] == 6
    assert 0 < stats["new_tokens"] <= 6 * KW["max_new_tokens"]
    assert stats["tokens_per_s"] > 0


def test_batch_seed_mixes():
    assert batch_seed(0, 0) != batch_seed(0, 1) != batch_seed(1, 0)
    assert batch_seed(5, 2) == batch_seed(5, 2) and 0 <= batch_seed(5, 2) < 2**63


@pytest.mark.parametrize(("kw", "match"), [
    (dict(do_sample=False, num_return_sequences=2), "greedy"),
    (dict(temperature=0.0), "temperature > 0"),
    (dict(max_new_tokens=0), ">= 1"),
])
def test_bad_arguments(tiny, kw, match):
    model, tok = tiny
    with pytest.raises(ValueError, match=match):
        generate(model, tok, PROMPTS[:1], seed=0, **{**KW, **kw})


def test_uses_every_available_cpu(tiny, monkeypatch):
    import torch

    model, tok = tiny
    before = torch.get_num_threads()
    monkeypatch.setattr(generation, "available_cpus", lambda: 3)
    try:
        generate(model, tok, PROMPTS[:1], seed=0, **{**KW, "max_new_tokens": 1, "num_return_sequences": 1})
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_bfloat16_decodes_a_copy_and_is_seeded(tiny, ref):
    """precision="bfloat16" decodes with a bfloat16 copy made once; the loaded float32 model is untouched."""
    import torch

    model, tok = tiny
    first = generate(model, tok, PROMPTS, seed=1, precision="bfloat16", **KW)
    assert next(model.parameters()).dtype == torch.float32
    copy = generation.in_precision(model, "bfloat16")
    assert next(copy.parameters()).dtype == torch.bfloat16 and copy is generation.in_precision(model, "bfloat16")
    assert generation.in_precision(model, "float32") is model
    assert generate(model, tok, PROMPTS, seed=1, precision="bfloat16", **KW) == first
    assert [len(x) for x in first] == [2] * len(PROMPTS)
    assert generate(model, tok, PROMPTS, seed=1, **KW) == ref  # float32 decoding unchanged by the copy
    with pytest.raises(ValueError, match="precision must be one of"):
        generate(model, tok, PROMPTS, seed=1, precision="int4", **KW)
