"""Pairwise judges: which of two responses to an instruction is better.

A judge turns filled-in judge prompts (the template in `paths.judge_template` with `{instruction}`,
`{response_a}`, `{response_b}` replaced) into P(A is better). Two judges, in the plain dict `JUDGES`:

- `local`: a causal LM from a local folder (default: the base model). One forward pass per prompt;
  P(A) = p("A") / (p("A") + p("B")) from the next-token distribution after the chat template's
  generation prompt (the letter with and without a leading space both count). No sampling.
- `openai`: any OpenAI-compatible chat endpoint (`base_url`, `model`), temperature 0. With
  `logprobs: true` P(A) comes from the first token's top log-probs; otherwise (or when the endpoint
  sends none) from the first standalone "A" or "B" in the reply (1 or 0), and a reply with neither
  counts as a tie (0.5) and is counted in `unparsed`. The key comes from the environment variable
  named by `api_key_env`, never from params. Transient errors are retried by the client with backoff
  (`max_retries`); requests are spaced to stay under `requests_per_minute`.

`judge_pairs` judges every pair in both orders (to cancel position bias) and caches each judgment
under (judge id, template sha256, hashes of instruction and both responses, the judge code's sha256
and, for the local judge, library versions, device and dtype). A remote judge is found by its alias
(`gpt-4o-mini`) but an entry stores the snapshot that answered (the response's `model`, e.g.
`gpt-4o-mini-2024-07-18`): before cached verdicts are used one request shows which snapshot answers
now, and entries from another snapshot are judged again. `agreement` measures a
judge against human labels (`openrelease judge-agreement FILE`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.errors import DataError, SourceError
from pipeline.core.lineage import sha256_bytes
from pipeline.core.params import JudgeParams, LocalJudgeParams, OpenAIJudgeParams
from pipeline.eval.cache import EvalCache

log = logging.getLogger(__name__)

PLACEHOLDERS = ("{instruction}", "{response_a}", "{response_b}")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
LETTERS = ("A", "B")


def text_sha(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


@dataclass(frozen=True)
class Template:
    text: str
    sha256: str
    path: str

    def fill(self, instruction: str, response_a: str, response_b: str) -> str:
        # One pass over the template only: braces elsewhere, or a placeholder quoted inside a
        # response, are left alone (str.format or chained replaces would substitute them).
        values = {"{instruction}": instruction, "{response_a}": response_a, "{response_b}": response_b}
        return _PLACEHOLDER.sub(lambda m: values[m.group(0)], self.text)


def load_template(path: str | Path) -> Template:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "judge template exists", "no such file (paths.judge_template)")
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    for ph in PLACEHOLDERS:
        if text.count(ph) != 1:
            raise DataError(path, None, "judge template placeholders",
                            f"{ph} must appear exactly once, found {text.count(ph)}")
    return Template(text=text, sha256=sha256_bytes(raw), path=str(path))


class Judge(Protocol):
    id: dict[str, Any]
    unparsed: int
    # Remote judges only: the snapshot that answered each prompt of the last `prob_a` call.
    # snapshots: list[str | None]

    def prob_a(self, prompts: Sequence[str]) -> list[float]: ...


class LocalJudge:
    """Reads P("A") vs P("B") from one forward pass of a local causal LM per judge prompt."""

    def __init__(self, p: LocalJudgeParams, folder: Path, model_sha256: str,
                 loader: Callable[[Path], tuple[Any, Any]]):
        self.p, self.folder, self.loader = p, folder, loader
        self.id = {"kind": "local", "model_sha256": model_sha256, "max_length": p.max_length,
                   "batch_size": p.batch_size, "runtime": _local_runtime(loader, folder)}
        self.unparsed = 0
        self._loaded: tuple[Any, Any, list[list[int]]] | None = None

    def _load(self):
        if self._loaded is None:
            model, tok = self.loader(self.folder)
            letter_ids = []
            for letter in LETTERS:
                ids = {tok.encode(v, add_special_tokens=False)[0] for v in (letter, " " + letter)
                       if len(tok.encode(v, add_special_tokens=False)) == 1}
                if not ids:
                    raise SourceError(f"judge model {self.folder}: no single token for {letter!r}")
                letter_ids.append(sorted(ids))
            self._loaded = (model, tok, letter_ids)
        return self._loaded

    def prob_a(self, prompts: Sequence[str]) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        model, tok, (ids_a, ids_b) = self._load()
        seqs = []
        for text in prompts:
            ids = list(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                               return_dict=True, add_generation_prompt=True)["input_ids"])
            if len(ids) > self.p.max_length:
                log.warning("judge prompt of %d tokens cut to its last %d", len(ids), self.p.max_length)
                ids = ids[-self.p.max_length:]
            seqs.append(ids)
        out: list[float] = []
        model.eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(model.parameters()).device
        # Only the last position's logits are needed: skip the vocabulary projection elsewhere.
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        bs = self.p.batch_size
        with torch.inference_mode():
            for k in tqdm(range(0, len(seqs), bs), desc="judge (local)", unit="batch"):
                batch = seqs[k:k + bs]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, s in enumerate(batch):  # left padding: every row ends at the last column
                    ids[r, width - len(s):] = torch.tensor(s)
                    mask[r, width - len(s):] = 1
                positions = (mask.cumsum(1) - 1).clamp(min=0)  # padding must not shift positions
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), **keep).logits[:, -1].float().cpu()
                probs = torch.softmax(logits, dim=-1)
                pa, pb = probs[:, ids_a].sum(-1), probs[:, ids_b].sum(-1)
                out.extend((pa / (pa + pb)).tolist())
        return out


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (thread-safe)."""

    def __init__(self, requests_per_minute: float, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / requests_per_minute
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self.clock()
            if self._next > now:
                self.sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


_LETTER = re.compile(r"\b([AB])\b")


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint as a judge."""

    def __init__(self, p: OpenAIJudgeParams):
        from openai import OpenAI

        self.p = p
        key = "not-needed"
        if p.api_key_env is not None:
            key = os.environ.get(p.api_key_env, "")
            if not key:
                raise SourceError(f"evaluate.judge.openai.api_key_env: environment variable {p.api_key_env} "
                                  "is not set (the judge's API key is read from it)")
        self.client = OpenAI(base_url=p.base_url, api_key=key, max_retries=p.max_retries, timeout=p.timeout_s)
        self.limiter = RateLimiter(p.requests_per_minute)
        self.id = {"kind": "openai", "base_url": p.base_url, "model": p.model, "max_tokens": p.max_tokens,
                   "logprobs": p.logprobs, "temperature": 0.0}
        self.unparsed = 0
        self.snapshots: list[str | None] = []

    def _one(self, prompt: str) -> float:
        import openai

        kwargs: dict[str, Any] = {"model": self.p.model, "messages": [{"role": "user", "content": prompt}],
                                  "temperature": 0.0, "max_tokens": self.p.max_tokens}
        if self.p.logprobs:
            kwargs.update(logprobs=True, top_logprobs=5)
        self.limiter.wait()
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            raise SourceError(f"judge endpoint {self.p.base_url} answered {e.status_code} "
                              f"after {self.p.max_retries} retries: {str(e.message)[:200]}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise SourceError(f"judge endpoint {self.p.base_url} cannot be reached "
                              f"after {self.p.max_retries} retries: {e}") from None
        self.snapshots.append(getattr(resp, "model", None) or None)
        choice = resp.choices[0]
        p = _prob_from_logprobs(choice)
        if p is not None:
            return p
        m = _LETTER.search((choice.message.content or "").strip())
        if m is None:
            self.unparsed += 1
            log.warning("judge reply has no A/B verdict, counted as a tie: %r", (choice.message.content or "")[:80])
            return 0.5
        return 1.0 if m.group(1) == "A" else 0.0

    def prob_a(self, prompts: Sequence[str]) -> list[float]:
        from tqdm.auto import tqdm

        self.snapshots = []
        return [self._one(p) for p in tqdm(prompts, desc=f"judge ({self.p.model})", unit="req")]


def _local_runtime(loader: Any, folder: Path) -> dict[str, Any]:
    """Device, dtype, kernel and libraries of a local judge when its loader knows them (`Models.load`)."""
    from pipeline.core.fingerprint import library_versions

    owner = getattr(loader, "__self__", None)
    runtime = owner.runtime(folder) if hasattr(owner, "runtime") else {"device": "cpu", "loader": getattr(loader, "__qualname__", type(loader).__name__)}
    return {**runtime, "versions": library_versions("torch", "transformers", "tokenizers")}


def _prob_from_logprobs(choice: Any) -> float | None:
    """P(A) / (P(A) + P(B)) from the first generated token's alternatives, when the endpoint sends them."""
    import math

    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    mass = {"A": 0.0, "B": 0.0}
    for alt in content[0].top_logprobs or []:
        tok = alt.token.strip()
        if tok in mass:
            mass[tok] += math.exp(alt.logprob)
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


def make_local_judge(p: JudgeParams, *, default_model: Path, sha256_of: Callable[[Path], str],
                     loader: Callable[[Path], tuple[Any, Any]]) -> LocalJudge:
    folder = Path(p.local.model) if p.local.model else default_model
    if not folder.is_dir():
        raise SourceError(f"evaluate.judge.local.model: folder {folder} does not exist")
    return LocalJudge(p.local, folder, sha256_of(folder), loader)


def make_openai_judge(p: JudgeParams, **_: Any) -> OpenAIJudge:
    return OpenAIJudge(p.openai)


JUDGES: dict[str, Callable[..., Judge]] = {"local": make_local_judge, "openai": make_openai_judge}


def judge_pairs(judge: Judge, template: Template, pairs: Sequence[tuple[str, str, str]],
                cache: EvalCache) -> list[tuple[float, float]]:
    """For each (instruction, x, y): (P(x better) shown as A, P(x better) shown as B).

    Judgments already in `cache` are not asked again; only the missing ones go to the judge. For a remote
    judge an entry counts only if the snapshot that answered it is the one answering now.
    """
    from pipeline.core.fingerprint import code_part

    code = code_part("pipeline.eval.judges")
    keys, prompts = [], []
    for instruction, x, y in pairs:
        for a, b in ((x, y), (y, x)):
            keys.append({"judge": judge.id, "template": template.sha256, "instruction": text_sha(instruction),
                         "a": text_sha(a), "b": text_sha(b), "code": code})
            prompts.append(template.fill(instruction, a, b))
    entries: list[Any] = [cache.get("judgment", k) for k in keys]
    entries = [e if isinstance(e, dict) and "p" in e else None for e in entries]
    remote = hasattr(judge, "snapshots")
    todo = [i for i, e in enumerate(entries) if e is None]
    if remote and not todo and entries:
        todo = [0]  # one request shows which snapshot answers the alias now
    current: str | None = None
    for _ in range(2):  # new answers; then, once the snapshot is known, entries from another one
        if todo:
            fresh = judge.prob_a([prompts[i] for i in todo])
            answered = list(getattr(judge, "snapshots", [])) or [None] * len(todo)
            for i, v, snap in zip(todo, fresh, answered, strict=True):
                entries[i] = {"p": float(v), "snapshot": snap}
                cache.put("judgment", keys[i], entries[i])
            current = answered[-1]
        if not remote:
            break
        todo = [i for i, e in enumerate(entries) if e["snapshot"] != current]
        if todo:
            log.info("judge %s is answered by snapshot %s now: re-judging %d verdicts from other snapshots",
                     judge.id.get("model"), current, len(todo))
            cache.misses["judgment"] += len(todo)
            cache.hits["judgment"] -= len(todo)
    if remote:
        judge.snapshot = current  # what answered; for metrics and lineage
    probs = [e["p"] for e in entries]
    return [(probs[2 * k], 1.0 - probs[2 * k + 1]) for k in range(len(pairs))]


def verdict(score: float) -> str:
    """A both-orders score for the first response as a label: A, B or tie."""
    return "A" if score > 0.5 else "B" if score < 0.5 else "tie"
