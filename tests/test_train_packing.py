"""Padding-free micro-batches (pipeline/train/packing.py): same values as TRL's padded forward, no
attention across sequences, and the mode recorded where results depend on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny Llama with TRL's fused LM head and LoRA adapters whose B is non-zero (so they matter)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.lm.loading import load_causal_lm
    from pipeline.train.packing import register_attention

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir, attn_implementation=register_attention(), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def _batch(lengths, prompt_len=3, vocab=500, seed=0):
    """A right-padded batch like TRL's collator makes: labels only on the completion part."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    completion = mask.clone()
    completion[:, :prompt_len] = 0
    return ids, mask, ids.masked_fill(completion == 0, -100)


def _forward(fwd, model, batch):
    ids, mask, labels = batch
    model.zero_grad()
    out = fwd(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    weights = torch.arange(1, out.log_probs.size(0) + 1, dtype=torch.float32)
    (out.log_probs.sum(1) * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, grads


@pytest.mark.parametrize("compact_head", [True, False])
def test_packed_forward_equals_the_padded_one(lora_model, compact_head):
    """Values and adapter gradients match TRL's padded forward (with and without the completion-only head)."""
    from pipeline.train.packing import PackedForward
    from pipeline.train.trainer import completion_only_lm_head

    batch = _batch([17, 9, 30, 4])
    with completion_only_lm_head(compact_head):
        padded, g_padded = _forward(lora_model, lora_model, batch)
        packed, g_packed = _forward(PackedForward(lora_model), lora_model, batch)
    for field in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(padded, field), getattr(packed, field)
        assert a.shape == b.shape == (4, 29), field
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert torch.equal(packed.is_top1, padded.is_top1) and torch.equal(packed.label_mask, padded.label_mask)
    assert padded.log_probs[2].abs().sum() > 0 and packed.log_probs[3, 3:].abs().sum() == 0  # padding stays 0
    torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-6)


def test_sequences_do_not_attend_to_each_other(lora_model, monkeypatch):
    """Changing the first sequence changes none of the second's outputs: attention stays inside a sequence
    (a plain causal mask over the packed row would let the second see the first), and it is the
    per-sequence causal SDPA that runs, with no mask built for the packed row."""
    import types

    from pipeline.train import packing
    from pipeline.train.packing import PackedForward

    calls = []

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], attn_mask is None and is_causal))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(packing, "F", types.SimpleNamespace(scaled_dot_product_attention=spy))

    ids, mask, labels = _batch([12, 10])
    other = ids.clone()
    other[0, :12] = (other[0, :12] + 7) % 500 + 1
    with torch.no_grad():
        a = PackedForward(lora_model)(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        b = PackedForward(lora_model)(input_ids=other, attention_mask=mask,
                                      labels=other.masked_fill(labels == -100, -100), fused_lm_head=True)
    torch.testing.assert_close(a.log_probs[1], b.log_probs[1], rtol=0, atol=1e-6)
    layers = lora_model.config.num_hidden_layers
    assert calls == [(12, True), (10, True)] * layers * 2  # two forwards, each sequence on its own, causal
    assert not torch.allclose(a.log_probs[0], b.log_probs[0])


def test_pack_layout_and_left_padding_refused():
    from pipeline.train.packing import pack, unpack

    ids, mask, labels = _batch([4, 2], prompt_len=1)
    packed = pack(ids, mask, labels)
    assert packed["input_ids"].tolist() == [ids[0, :4].tolist() + ids[1, :2].tolist()]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 4, 6]
    # each position's label is its own sequence's next token; the last position of a sequence has none
    assert packed["shift_labels"].tolist() == [labels[0, 1:4].tolist() + [-100, labels[1, 1].item(), -100]]
    values = torch.arange(6, dtype=torch.float32)[None]
    assert unpack(values, packed["keep"]).tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 0.0]]
    with pytest.raises(ValueError, match="right-padded"):
        pack(ids, mask.flip(1), labels)


def test_plan_packs_with_sdpa_only():
    from pipeline.core.params import load_params
    from pipeline.train.setup import make_plan

    p = load_params(ROOT / "params.yaml").train
    assert p.packing is True and make_plan(p, ROOT, world_size=1).packing is True
    assert make_plan(p.model_copy(update={"attn_implementation": "eager"}), ROOT, world_size=1).packing is False
    assert make_plan(p.model_copy(update={"packing": False}), ROOT, world_size=1).packing is False


def test_padded_and_packed_training_agree_and_are_keyed_apart(tmp_path, tiny_model_dir):
    """The stage with packing (the default) and without: the plans say which, the second run's reference
    cache misses (its key names the mode), and both give the same reference log-probs and adapter
    weights up to float rounding."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.stages.train import run
    from tests.test_train import _run_kwargs, tiny_params, write_pairs

    data = write_pairs(tmp_path / "data")
    p = tiny_params().train
    packed = run(p, **_run_kwargs(tmp_path, tiny_model_dir, data, p, ckpt="ckpt-packed", out="out-packed"))
    padded_p = p.model_copy(update={"packing": False})
    kw = _run_kwargs(tmp_path, tiny_model_dir, data, padded_p, ckpt="ckpt-padded", out="out-padded")
    kw["ref_logps_dir"] = tmp_path / "ref-padded"
    shutil.copytree(tmp_path / "ref", kw["ref_logps_dir"])
    padded = run(padded_p, **kw)
    assert packed["plan"]["packing"] is True and padded["plan"]["packing"] is False
    assert padded["metrics"]["ref_logps_cache_hit"] == 0.0
    caches = [load_file(f) for d in ("ref", "ref-padded") for f in sorted((tmp_path / d).glob("train-*"))]
    assert len(caches) == 3  # the packed run's, its copy, the padded run's
    torch.testing.assert_close(caches[0]["ref_chosen_logps"], caches[2]["ref_chosen_logps"], rtol=1e-5, atol=1e-4)
    a, b = (load_file(tmp_path / out / "adapter" / "adapter_model.safetensors") for out in ("out-packed", "out-padded"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)
    assert packed["metrics"]["steps"] == padded["metrics"]["steps"] == 4
