"""Teacher-forced scoring of chat completions: summed log-probabilities and per-token KL.

Sequences are tokenized the way TRL's DPOTrainer tokenizes a conversational preference pair: the
prompt with the generation prompt, the whole conversation with the completion, and the completion
starts where the two token lists diverge. So the implicit reward computed from these log-probs is
the one `train` optimised.

The forward pass (`forward_kept`) computes only what scoring reads, with the same arithmetic:

- **shared prefix**: the leading tokens every sequence of a batch has in common are encoded once, at
  batch 1, and the rest of each row attends to that one copy of their keys and values (the model sees
  the same sequence at the same positions). Completions of one prompt are batched together, so a
  preference pair's prompt is encoded once for all of its completions; other batches share the chat
  template's system turn;
- **kept logits only**: the vocabulary projection runs only at the positions whose next token is
  scored (`logits_to_keep` as a boolean mask), not at prompt or padding positions.

`share_prefix=False` runs the plain reference path (every row encoded whole, logits everywhere): tests
check the two agree, and `bench/bench_scoring.py` times them side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Scored:
    """Token ids of prompt + completion, and where the completion starts."""

    ids: list[int]
    start: int

    @property
    def n_completion(self) -> int:
        return len(self.ids) - self.start


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def tokenize_completion(tokenizer, prompt: list[dict], completion: list[dict],
                        max_length: int | None = None) -> Scored:
    """Prompt + completion ids, truncated at `max_length` keeping the start (TRL's `keep_start`)."""
    prompt_ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                    add_generation_prompt=True)["input_ids"])
    full = chat_ids(tokenizer, prompt + completion)
    start = 0
    for a, b in zip(prompt_ids, full, strict=False):
        if a != b:
            break
        start += 1
    if max_length is not None:
        full = full[:max_length]
    # the first token has no context to be predicted from, so a completion starts at 1 at the earliest
    return Scored(full, max(1, min(start, len(full))))


def _batches(items: Sequence[Scored], batch_size: int):
    """Index batches of similar length (less padding), in a stable order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    for k in range(0, len(order), batch_size):
        yield order[k:k + batch_size]


def prompt_batches(items: Sequence[Scored], batch_size: int) -> list[list[int]]:
    """Index batches in which the completions of one prompt stay together (their batch shares the whole
    prompt), shortest first; prompts with a single completion are batched by length."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(items):
        by_prompt.setdefault(tuple(s.ids[:s.start]), []).append(i)
    batches, single = [], []
    for group in by_prompt.values():
        if len(group) == 1:
            single += group
            continue
        group.sort(key=lambda i: len(items[i].ids))
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    return batches + [[single[j] for j in b] for b in _batches([items[i] for i in single], batch_size)]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `seqs` have in common."""
    first, n = seqs[0], min(map(len, seqs))
    for k in range(n):
        if any(s[k] != first[k] for s in seqs[1:]):
            return k
    return n


def forward_kept(model, seqs: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], *, pad_id: int,
                 share_prefix: bool = True, states: Sequence | None = None) -> list:
    """Float32 logits of each row of `seqs` at the positions in its `keep` list ([len(keep[r]), vocab] per
    row), from one forward pass of the batch.

    What precedes every kept position need not be encoded again: `states[r]` (from `cache_states`), when
    given, holds row r's keys and values for its first `states[r].shape[-2]` tokens (a prompt its
    generation encoded); otherwise the batch's shared prefix is encoded once. The rest is right-padded
    behind the cached part, and positions follow each row's real tokens, so the model sees each sequence
    as it is."""
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    from pipeline.lm.decode import PREFIX_MIN_TOKENS, cache_states

    device = next(model.parameters()).device
    if states is None and share_prefix and len(seqs) > 0:
        first_kept = min(min(k) for k in keep if k) if any(keep) else 0
        shared = min(common_prefix(seqs), first_kept)
        if shared >= PREFIX_MIN_TOKENS:
            n_layers = model.config.get_text_config().num_hidden_layers
            prefix = Cache(layers=[DynamicLayer() for _ in range(n_layers)])
            model(input_ids=torch.tensor([list(seqs[0][:shared])], device=device), cache=prefix, use_cache=True,
                  logits_to_keep=1)
            states = cache_states(prefix) * len(seqs)
    done = [0] * len(seqs) if states is None else [int(st.shape[-2]) for st in states]
    longest = max(done)
    cache = None
    if longest:
        n_layers, _, heads, _, dim = states[0].shape
        k = states[0].new_zeros(n_layers, len(seqs), heads, longest, dim)
        v = torch.zeros_like(k)
        for r, st in enumerate(states):  # right-aligned: a row's padding comes before its cached tokens
            k[:, r, :, longest - done[r]:] = st[:, 0]
            v[:, r, :, longest - done[r]:] = st[:, 1]
        cache = Cache(layers=[DynamicLayer() for _ in range(n_layers)])
        for i, layer in enumerate(cache.layers):
            layer.update(k[i].to(device), v[i].to(device))
    width = max(len(s) - d for s, d in zip(seqs, done, strict=True))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest + width), dtype=torch.long)
    kept = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, kp, d) in enumerate(zip(seqs, keep, done, strict=True)):
        ids[r, :len(s) - d] = torch.tensor(list(s[d:]))
        mask[r, longest - d:longest + len(s) - d] = 1
        kept[r, [p - d for p in kp]] = True
    positions = torch.tensor(done)[:, None] + torch.arange(width)[None]
    extra = {"cache": cache, "use_cache": True} if cache is not None else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=kept.to(device), **extra).logits.float().cpu()
    return list(logits.reshape(-1, logits.shape[-1]).split([len(k) for k in keep]))


def _scored_rows(s: Scored) -> list[int]:
    """Positions whose logits predict the completion's tokens: the token at t is predicted at t - 1."""
    return list(range(s.start - 1, len(s.ids) - 1))


def _plain_rows(model, batch: list[Scored], pad_id: int) -> list:
    """The reference path: every row encoded whole, logits at every position, then the scored rows."""
    logits = _forward(model, batch, pad_id)
    return [logits[r, s.start - 1:len(s.ids) - 1] for r, s in enumerate(batch)]


def _scored_logits(model, batch: list[Scored], pad_id: int, share_prefix: bool, states: list | None = None) -> list:
    if not share_prefix:
        return _plain_rows(model, batch, pad_id)
    return forward_kept(model, [s.ids for s in batch], [_scored_rows(s) for s in batch], pad_id=pad_id,
                        states=states)


def prompt_states_for(batch: list[Scored], states: dict | None) -> list | None:
    """The cached prompt states of a batch's rows, cut to all but each prompt's last token (its logits
    predict the first completion token, so it is encoded again); None unless every row has them."""
    if not states:
        return None
    got = [states.get(tuple(s.ids[:s.start])) for s in batch]
    if any(g is None or s.start < 2 for g, s in zip(got, batch, strict=True)):
        return None
    return [g[..., :s.start - 1, :] for g, s in zip(got, batch, strict=True)]


def _forward(model, items: list[Scored], pad_id: int):
    """Logits of a right-padded batch (position ids are then the plain 0..n-1 of each row)."""
    import torch

    width = max(len(s.ids) for s in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, s in enumerate(items):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        mask[r, :len(s.ids)] = 1
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()


def _score_order(items: Sequence[Scored], batch_size: int, share_prefix: bool) -> list[list[int]]:
    return prompt_batches(items, batch_size) if share_prefix else list(_batches(items, batch_size))


def completion_logps(model, items: Sequence[Scored], *, pad_id: int, batch_size: int,
                     desc: str = "log-probs", share_prefix: bool = True) -> list[float]:
    """Sum of log p(token) over each item's completion tokens (0.0 for an empty completion)."""
    import torch

    out = [0.0] * len(items)
    model.eval()
    with torch.inference_mode():
        for idx in tqdm(_score_order(items, batch_size, share_prefix), desc=desc, unit="batch"):
            idx = [i for i in idx if items[i].n_completion > 0]
            if not idx:
                continue
            batch = [items[i] for i in idx]
            for i, s, rows in zip(idx, batch, _scored_logits(model, batch, pad_id, share_prefix), strict=True):
                targets = torch.tensor(s.ids[s.start:])
                out[i] = float(torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).sum())
    return out


def completion_kl(policy, ref, items: Sequence[Scored], *, pad_id: int, batch_size: int,
                  desc: str = "KL", share_prefix: bool = True,
                  prompt_states: tuple[dict, dict] | None = None) -> list[tuple[float, int]]:
    """Per item, (sum over completion positions of KL(policy(.|ctx) || ref(.|ctx)), number of positions).

    The KL at each position is exact over the whole vocabulary, given the context the completion
    has produced so far; see `pipeline.stages.evaluate` for what the average estimates.
    `prompt_states`: (policy's, reference's) keys and values of prompts their generation encoded, keyed
    by the prompt's token ids (`pipeline.lm.generation.generate(prompt_states=...)`): a batch whose rows
    all have them encodes only its completions.
    """
    import torch

    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    policy.eval()
    ref.eval()
    with torch.inference_mode():
        for idx in tqdm(_score_order(items, batch_size, share_prefix), desc=desc, unit="batch"):
            idx = [i for i in idx if items[i].n_completion > 0]
            if not idx:
                continue
            batch = [items[i] for i in idx]
            pol_states, ref_states = prompt_states or (None, None)
            pol = _scored_logits(policy, batch, pad_id, share_prefix, prompt_states_for(batch, pol_states))
            ref_rows = _scored_logits(ref, batch, pad_id, share_prefix, prompt_states_for(batch, ref_states))
            for i, s, a, b in zip(idx, batch, pol, ref_rows, strict=True):
                a, b = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
                out[i] = (float((a.exp() * (a - b)).sum()), s.n_completion)
    return out
