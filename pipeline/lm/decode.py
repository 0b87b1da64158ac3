"""A decoding loop for batched sampling and greedy decoding on CPU, around the model's own forward.

`model.generate` spends most of a CPU decoding step outside the matmuls. A torch profile of one
batch of the default `generate` workload (48 sequences, 48 new tokens, top_p 0.95; SmolLM2-135M, 2
cores; see BENCHMARKS.md) put 18% of CPU time in the full-vocabulary sort of top-p, 11% in
`torch.multinomial`'s draw over all 49,152 tokens, and the prompt prefill was done once per returned
sequence. This loop keeps the model's forward pass (so every architecture transformers supports works)
and changes only what surrounds it:

- **shared prefill**: with n samples per prompt, the prompt is encoded once and its KV cache repeated
  n times (`repeat_interleave`), instead of encoding n copies;
- **prefill by length group**: a left-padded batch of prompts of mixed lengths would encode every row
  at the longest prompt's length (evaluate's 97 greedy prompts, 39-112 tokens: 10,864 padded positions
  for 5,563 real ones). Rows are encoded in groups of similar length, each padded only to its own
  longest prompt, and their KV caches written into the batch's cache at the same (right-aligned) slots;
  the slots left before a group's window are zeros and masked, as padding is;
- **shared prompt prefix**: the prompts of a batch usually start with the same tokens (the chat
  template's system turn: 24 of the default train prompts' ~52 tokens with SmolLM2's template). That
  prefix is encoded once, at batch 1, and each row's cache holds it first, then padding, then the rest
  of its prompt (positions follow the real tokens, so the model sees the same sequence);
- **preallocated KV cache** (`PreallocatedLayer`): every layer writes into a buffer sized prompt +
  max_new_tokens, and attention reads a view of the filled part, instead of concatenating per step;
- **finished sequences leave the batch**: once an eighth of the rows have stopped, the cache keeps
  only the live rows, so later steps compute nothing for them;
- **exact top-p without a full sort**: `torch.topk` takes the k most likely tokens, doubling k until
  they hold at least top_p of the mass; the nucleus is then inside them, so the kept set and its
  renormalised distribution are exactly those of transformers' TopPLogitsWarper (temperature first,
  then top-p, keeping at least one token). The draw is over those k tokens only.

Randomness comes from the global torch generator, which the caller seeds (`generation.generate` forks
and seeds it per batch), so the same seed and inputs give the same tokens. The samples follow the
same distribution as `model.generate`'s but not the same random stream, so they are not the same
tokens as transformers would draw with that seed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Compact the batch when at least this share of its rows has finished: a compaction copies every
# layer's cache once, so doing it for every single finished row costs more than it saves.
COMPACT_SHARE = 1 / 8
FIRST_TOP_K = 64  # starting candidate count for top-p; doubled until the nucleus fits
# A prefill group grows while its padded size stays within this factor of its real tokens, and holds at
# least PREFILL_MIN_ROWS rows so its matmuls stay large enough to run near the CPU's matmul rate.
PREFILL_MAX_PADDING = 1.15
PREFILL_MIN_ROWS = 8
# A common prompt prefix shorter than this is encoded with each row: sharing it costs one more forward
# (here and in pipeline.lm.scoring.forward_kept, which shares a batch's prefix the same way).
PREFIX_MIN_TOKENS = 8


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer of fixed length; `update` writes in place and returns a view."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)
        self.v_buf = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.length + q > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
        self.k_buf[:, :, self.length : self.length + q] = key_states
        self.v_buf[:, :, self.length : self.length + q] = value_states
        self.length += q
        self._views()
        return self.keys, self.values

    def allocate(self, like: torch.Tensor, batch: int, length: int) -> None:
        """Zeroed buffers for `batch` rows shaped like the key/value states `like` ([rows, heads, q, dim]),
        treated as filled up to `length` (the prefill groups write their slots with `write`)."""
        _, h, _, d = like.shape
        self.device = like.device
        self.k_buf = like.new_zeros(batch, h, self.capacity, d)
        self.v_buf = like.new_zeros(batch, h, self.capacity, d)
        self.is_initialized, self.length = True, length
        self._views()

    def write(self, rows: torch.Tensor, end: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a group's prefill keys/values ([len(rows), heads, q, dim]) into slots [end - q, end) of `rows`."""
        q = keys.shape[-2]
        self.k_buf[rows, :, end - q : end] = keys
        self.v_buf[rows, :, end - q : end] = values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
            self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
            self._views()


def cache_states(cache, rows=None) -> list:
    """Each row's keys and values in a transformers Cache as one [layers, 2, kv_heads, length, head_dim]
    tensor; `rows` maps a row to the cache slots it holds (default: every slot)."""
    n = cache.layers[0].keys.shape[0]
    out = []
    for r in range(n):
        slots = slice(None) if rows is None else rows[r]
        out.append(torch.stack([torch.stack([layer.keys[r][:, slots], layer.values[r][:, slots]])
                                for layer in cache.layers]))
    return out


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row of `probs`: (probabilities, zero outside the nucleus; token ids),
    both [rows, k] with k the smallest power-of-two multiple of FIRST_TOP_K whose top tokens hold top_p."""
    vocab = probs.shape[-1]
    k = min(FIRST_TOP_K, vocab)
    while True:
        top, idx = probs.topk(k, dim=-1)  # sorted, most likely first
        cum = top.cumsum(dim=-1)
        if k == vocab or bool((cum[:, -1] >= top_p).all()):
            break
        k = min(2 * k, vocab)
    # TopPLogitsWarper keeps a token when the mass strictly above it is below top_p (the first always).
    keep = (cum - top) < top_p
    keep[:, 0] = True
    return top * keep, idx


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus."""
    top, idx = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return idx.gather(-1, torch.multinomial(top, 1)).squeeze(-1)


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in groups of similar prompt length, longest first (see PREFILL_MAX_PADDING)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and (len(g) < PREFILL_MIN_ROWS or lengths[g[0]] * (len(g) + 1) <= PREFILL_MAX_PADDING * (real + lengths[i])):
            g.append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every left-padded prompt of the batch has in common (the chat template's
    system turn, say), at most the shortest prompt's length minus one: each row keeps a token of its own,
    whose logits start its decoding."""
    n, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    shortest = int(lengths.min())
    if n < 2 or shortest < 2:
        return 0
    heads = input_ids.gather(1, (width - lengths)[:, None] + torch.arange(shortest - 1)[None])
    return int((heads == heads[:1]).all(0).long().cumprod(0).sum())


def prefix_first(t: torch.Tensor, attention_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """The columns of left-padded `t` reordered per row to [shared prefix | padding | rest of the prompt]."""
    n, width = t.shape
    start = (width - attention_mask.sum(-1))[:, None]  # each row's first real token
    col = torch.arange(width)[None]
    src = torch.where(col < prefix, start + col, torch.where(col < start + prefix, col - prefix, col))
    return t.gather(1, src)


def prefill(model, cache: Cache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            positions: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Encode prompts into `cache` group by group; returns the last position's logits. Rows are left-padded,
    or, with `prefix` > 0, laid out as `prefix_first` makes them: the shared prefix is then encoded once
    and every group attends to that one copy of its keys and values."""
    n, width = input_ids.shape
    groups = prefill_groups(attention_mask[:, prefix:].sum(-1).tolist())
    if len(groups) == 1 and not prefix:  # one group: the batch as it is
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]
    shared = None
    if prefix:
        shared = Cache(layers=[PreallocatedLayer(prefix) for _ in cache.layers])
        model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix],
              position_ids=positions[:1, :prefix], cache=shared, use_cache=True, logits_to_keep=1)
    logits = None
    for g in groups:
        rows = torch.tensor(g)
        span = int(attention_mask[rows, prefix:].sum(-1).max())  # the group's longest rest: its padded width
        window = slice(width - span, width)
        part = Cache(layers=[PreallocatedLayer(prefix + span) for _ in cache.layers])
        mask = attention_mask[rows, window]
        if shared is not None:
            for layer, pre in zip(part.layers, shared.layers, strict=True):
                layer.update(pre.keys.expand(len(g), -1, -1, -1), pre.values.expand(len(g), -1, -1, -1))
            mask = torch.cat([attention_mask[rows, :prefix], mask], dim=-1)
        out = model(input_ids=input_ids[rows, window], attention_mask=mask, position_ids=positions[rows, window],
                    cache=part, use_cache=True, logits_to_keep=1)
        for i, (layer, piece) in enumerate(zip(cache.layers, part.layers, strict=True)):
            if not layer.is_initialized:
                layer.allocate(piece.keys, n, width)
                if shared is not None:
                    layer.write(torch.arange(n), prefix, shared.layers[i].keys, shared.layers[i].values)
            layer.write(rows, width, piece.keys[:, :, prefix:], piece.values[:, :, prefix:])
        if logits is None:
            logits = out.logits.new_empty(n, out.logits.shape[-1])
        logits[rows] = out.logits[:, -1]
    return logits


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_ids: list[int], pad_id: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
           num_return_sequences: int = 1, prompt_states: list | None = None) -> torch.Tensor:
    """New tokens for left-padded prompts, shape [prompts x num_return_sequences, max_new_tokens]:
    the rows of one prompt are adjacent; after a row's first EOS it holds pad_id. `prompt_states`, when a
    list, receives each prompt's keys and values after the prefill (`cache_states`:
    its real tokens in order, padding left out), for a later pass that scores what follows the prompt."""
    n_prompts, prompt_len = input_ids.shape
    cache = Cache(layers=[PreallocatedLayer(prompt_len + max_new_tokens)
                          for _ in range(model.config.num_hidden_layers)])
    prefix = shared_prefix(input_ids, attention_mask)
    if prefix < PREFIX_MIN_TOKENS:
        prefix = 0
    else:  # the cache holds the shared prefix at the front of every row, then padding, then the rest
        input_ids, attention_mask = (prefix_first(input_ids, attention_mask, prefix),
                                     prefix_first(attention_mask, attention_mask, prefix))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = prefill(model, cache, input_ids, attention_mask, positions, prefix)
    if prompt_states is not None:
        prompt_states += cache_states(cache, [row.nonzero().squeeze(-1) for row in attention_mask.bool()])
    if num_return_sequences > 1:  # the prompt was encoded once; its cache serves every sample
        for layer in cache.layers:
            layer.batch_repeat_interleave(num_return_sequences)
        logits = logits.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        positions = positions.repeat_interleave(num_return_sequences, dim=0)

    total = n_prompts * num_return_sequences
    result = torch.full((total, max_new_tokens), pad_id, dtype=torch.long)
    rows = torch.arange(total)  # which result row each live batch row is
    last_pos = positions[:, -1]
    eos = torch.tensor(eos_ids, dtype=torch.long)
    alive = torch.ones(total, dtype=torch.bool)  # per live batch row: no EOS yet
    for step in range(max_new_tokens):
        tokens = sample_top_p(logits, temperature, top_p) if do_sample else logits.argmax(dim=-1)
        result[rows[alive], step] = tokens[alive]
        alive &= ~torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or not alive.any():
            break
        if (~alive).sum() >= max(1, int(COMPACT_SHARE * len(rows))):
            keep = alive.nonzero().squeeze(-1)
            for layer in cache.layers:
                layer.batch_select_indices(keep)
            rows, tokens, attention_mask, last_pos = rows[keep], tokens[keep], attention_mask[keep], last_pos[keep]
            alive = alive[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        last_pos = last_pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=last_pos[:, None],
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]
    return result
