"""Padding-free micro-batches for TRL's DPO loss: the real tokens of a padded batch run as one row.

TRL's collator pads every sequence of a micro-batch (chosen and rejected of each pair) to the longest,
and TRL 1.16 turns its own `padding_free` off for DPO. Every padding position still goes through every
linear layer. Here the model sees one row of the real tokens only, with positions restarting at each
sequence, and attention runs per sequence (causal SDPA on each slice: no N x N mask, no cross-sequence
attention). The per-token outputs are scattered back to the padded [rows, length - 1] layout, so TRL's
loss and metrics code runs unchanged. The values equal the padded path's up to float rounding (tests
compare both); the rounding differs, so the mode is part of the reference-cache key and of the plan.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ATTENTION = "openrelease_varlen_sdpa"
# The per-token fields of TRL's FusedCausalLMOutput, laid out like the labels.
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Causal SDPA on each packed sequence; without `cu_seq_lens_q` (a padded batch), transformers' SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # CPU SDPA has no fused grouped-query path; this is what transformers' SDPA does there
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                            scale=scaling, is_causal=True)
             for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the per-sequence attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _varlen_sdpa)
    # Padded batches (evaluation, a reference pass without packing) still get SDPA's own mask.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """One row of the real tokens of a right-padded batch, with what the model and the unpacking need."""
    keep = attention_mask.bool()
    if not torch.equal(keep, keep.cummin(dim=1).values):
        raise ValueError("packing needs right-padded rows (ones, then zeros, in attention_mask)")
    lengths = keep.sum(dim=1)
    positions = torch.arange(keep.size(1), device=keep.device).expand_as(keep)[keep]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = lengths.cumsum(0)
    # The label each position predicts (the next token of its own sequence); a sequence's last real
    # position predicts nothing, which is also where the next sequence starts.
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)
    return {"input_ids": input_ids[keep][None], "position_ids": positions[None], "shift_labels": shifted[keep][None],
            "cu_seq_lens_q": cu, "keep": keep}


def unpack(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[1, N] per-token values back to the padded [rows, length - 1] layout TRL reads (zeros elsewhere)."""
    return values.new_zeros(keep.shape).masked_scatter(keep, values[0])[:, :-1]


class PackedForward:
    """Stands in for the model in TRL's loss and reference pass: padded batch in, padded outputs out."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *, input_ids, attention_mask, labels=None, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head or labels is None:  # e.g. TRL's deprecated return_outputs path: leave it padded
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              fused_lm_head=fused_lm_head, **kwargs)
        packed = pack(input_ids, attention_mask, labels)
        keep = packed.pop("keep")
        out = self.model(**packed, **kwargs, fused_lm_head=True)
        fields = {name: unpack(getattr(out, name), keep) if getattr(out, name) is not None else None
                  for name in _PER_TOKEN}
        return type(out)(loss=out.loss, aux_loss=out.aux_loss, **fields)
