"""Teacher-forced scoring of chat completions: summed log-probabilities and per-token KL.

Sequences are tokenized the way TRL's DPOTrainer tokenizes a conversational preference pair: the
prompt with the generation prompt, the whole conversation with the completion, and the completion
starts where the two token lists diverge. So the implicit reward computed from these log-probs is
the one `train` optimised.
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


def completion_logps(model, items: Sequence[Scored], *, pad_id: int, batch_size: int,
                     desc: str = "log-probs") -> list[float]:
    """Sum of log p(token) over each item's completion tokens (0.0 for an empty completion)."""
    import torch

    out = [0.0] * len(items)
    model.eval()
    with torch.inference_mode():
        for idx in tqdm(list(_batches(items, batch_size)), desc=desc, unit="batch"):
            batch = [items[i] for i in idx]
            logits = _forward(model, batch, pad_id)
            logp = torch.log_softmax(logits, dim=-1)
            for r, i in enumerate(idx):
                s = batch[r]
                if s.n_completion == 0:
                    continue
                # the token at position t is predicted by the logits at t - 1
                targets = torch.tensor(s.ids[s.start:])
                rows = logp[r, s.start - 1:len(s.ids) - 1]
                out[i] = float(rows.gather(-1, targets[:, None]).sum())
    return out


def completion_kl(policy, ref, items: Sequence[Scored], *, pad_id: int, batch_size: int,
                  desc: str = "KL") -> list[tuple[float, int]]:
    """Per item, (sum over completion positions of KL(policy(.|ctx) || ref(.|ctx)), number of positions).

    The KL at each position is exact over the whole vocabulary, given the context the completion
    has produced so far; see `pipeline.stages.evaluate` for what the average estimates.
    """
    import torch

    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    policy.eval()
    ref.eval()
    with torch.inference_mode():
        for idx in tqdm(list(_batches(items, batch_size)), desc=desc, unit="batch"):
            batch = [items[i] for i in idx]
            lp_pol = _forward(policy, batch, pad_id)
            lp_ref = _forward(ref, batch, pad_id)
            for r, i in enumerate(idx):
                s = batch[r]
                if s.n_completion == 0:
                    continue
                a = torch.log_softmax(lp_pol[r, s.start - 1:len(s.ids) - 1], dim=-1)
                b = torch.log_softmax(lp_ref[r, s.start - 1:len(s.ids) - 1], dim=-1)
                kl = (a.exp() * (a - b)).sum(-1)
                out[i] = (float(kl.sum()), s.n_completion)
    return out
