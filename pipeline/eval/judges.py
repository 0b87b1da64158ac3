"""Pairwise judges: which of two responses to an instruction is better.

A judge turns filled-in judge prompts (the template in `paths.judge_template` with `{instruction}`,
`{response_a}`, `{response_b}` replaced) into P(A is better). Two judges, in the plain dict `JUDGES`:

- `local`: a causal LM from a local folder (default: the base model). One forward pass per prompt;
  P(A) = p("A") / (p("A") + p("B")) from the next-token distribution after the chat template's
  generation prompt (the letter with and without a leading space both count). No sampling.
- `openai`: any OpenAI-compatible chat endpoint (`base_url`, `model`), temperature 0. With
  `logprobs: true` P(A) comes from the first token's top log-probs; otherwise (or when the endpoint
  sends none: `transformers serve` accepts the field and ignores it) from the first standalone "A"
  or "B" in the reply (1 or 0), and a reply with neither
  counts as a tie (0.5) and is flagged as unparsed (stored with the cached judgment, so a warm
  cache counts it too: `judge_pairs(..., outcome=)`). The key comes from the environment variable
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

PLACEHOLDERS = ("{instruction}", "{response_a}", "{response_b}")  # the defaults; params may rename them
LETTERS = ("A", "B")
ROLES = ("instruction", "response_a", "response_b")


def text_sha(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


@dataclass(frozen=True)
class Template:
    text: str
    sha256: str
    path: str
    placeholders: tuple[str, str, str] = PLACEHOLDERS
    system: str | None = None  # FastChat-style templates carry a system prompt beside the user prompt

    def fill(self, instruction: str, response_a: str, response_b: str) -> str:
        # One pass over the template only: braces elsewhere, or a placeholder quoted inside a
        # response, are left alone (str.format or chained replaces would substitute them).
        values = dict(zip(self.placeholders, (instruction, response_a, response_b), strict=True))
        pattern = re.compile("|".join(re.escape(p) for p in self.placeholders))
        return pattern.sub(lambda m: values[m.group(0)], self.text)

    def messages(self, filled: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": filled}]


def load_template(path: str | Path, placeholders: Sequence[str] | None = None) -> Template:
    """A judge prompt: a text file (the user message), or a JSON object in FastChat's
    `judge_prompts.jsonl` line format (`system_prompt` and `prompt_template`, e.g. MT-Bench's pair-v2)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "judge template exists", "no such file (paths.judge_template)")
    raw = path.read_bytes()
    text, system = raw.decode("utf-8-sig"), None
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, "judge template JSON", e.msg) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt_template"), str):
            raise DataError(path, None, "judge template JSON", "needs a string `prompt_template` (FastChat format)")
        text, system = obj["prompt_template"], obj.get("system_prompt") or None
    phs = tuple(placeholders or PLACEHOLDERS)
    for ph in phs:
        if text.count(ph) != 1:
            raise DataError(path, None, "judge template placeholders",
                            f"{ph} must appear exactly once, found {text.count(ph)}")
    return Template(text=text, sha256=sha256_bytes(raw), path=str(path), placeholders=phs, system=system)


def template_for(path: str | Path, judge: JudgeParams) -> Template:
    """The template with the placeholder names `evaluate.judge.placeholders` gives."""
    ph = judge.placeholders
    return load_template(path, (ph.instruction, ph.response_a, ph.response_b))


def parse_verdict(reply: str, verdicts: tuple[str, str, str | None]) -> float | None:
    """P(A better) from a judge's text reply: 1, 0, 0.5 for the tie verdict, None when none is found.

    Single-letter verdicts ("A"/"B") count as a whole word, the first found wins. Other verdict
    strings (MT-Bench's "[[A]]", "[[B]]", "[[C]]") are looked up as FastChat does: A if its token
    is anywhere in the reply, else B, else the tie.
    """
    a, b, tie = verdicts
    if all(v is None or v.isalnum() for v in verdicts):
        words = [v for v in (a, b, tie) if v]
        m = re.search(r"\b(" + "|".join(re.escape(v) for v in words) + r")\b", reply)
        if m is None:
            return None
        return 1.0 if m.group(1) == a else 0.0 if m.group(1) == b else 0.5
    if a in reply:
        return 1.0
    if b in reply:
        return 0.0
    if tie and tie in reply:
        return 0.5
    return None


class Judge(Protocol):
    id: dict[str, Any]
    unparsed: int
    # Remote judges only: the snapshot that answered each prompt of the last `prob_a` call, and
    # whether its reply held no verdict (`unparsed` counts those live calls only).
    # snapshots: list[str | None]
    # unparsed_flags: list[bool]

    def prob_a(self, prompts: Sequence[str]) -> list[float]: ...


def verdict_token_ids(tok: Any, verdicts: tuple[str, str, str | None], where: str) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, candidate ids per verdict) for reading a verdict from one next-token distribution.

    Single-token verdicts ("A"/"B"): each counts with and without a leading space, no prefix.
    Multi-token verdicts ("[[A]]"/"[[B]]"/"[[C]]"): their common leading tokens ("[[") are appended to
    the prompt and the first token where they differ is read.
    """
    used = [v for v in verdicts if v]
    seqs = [tok.encode(v, add_special_tokens=False) for v in used]
    if all(len(s) == 1 for s in seqs):
        ids = []
        for v in used:
            got = {tok.encode(x, add_special_tokens=False)[0] for x in (v, " " + v)
                   if len(tok.encode(x, add_special_tokens=False)) == 1}
            ids.append(sorted(got))
        return [], ids
    k = 0
    while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
        k += 1
    if any(len(s) <= k for s in seqs) or len({s[k] for s in seqs}) < len(seqs):
        raise SourceError(f"judge model {where}: verdicts {used} are not told apart by one token after "
                          "their common prefix (evaluate.judge.verdicts)")
    return seqs[0][:k], [[s[k]] for s in seqs]


class LocalJudge:
    """Reads P(verdict A) vs P(verdict B) (and the tie verdict, if any) from one forward pass of a
    local causal LM per judge prompt; a tie's probability counts half for each side."""

    def __init__(self, p: LocalJudgeParams, folder: Path, model_sha256: str,
                 loader: Callable[[Path], tuple[Any, Any]], verdicts: tuple[str, str, str | None] = ("A", "B", None)):
        self.p, self.folder, self.loader, self.verdicts = p, folder, loader, verdicts
        self.id = {"kind": "local", "model_sha256": model_sha256, "max_length": p.max_length,
                   "batch_size": p.batch_size, "runtime": _local_runtime(loader, folder)}
        if verdicts != ("A", "B", None):
            self.id["verdicts"] = list(verdicts)
        self.unparsed = 0
        self._loaded: tuple[Any, Any, list[int], list[list[int]]] | None = None

    def _load(self):
        if self._loaded is None:
            model, tok = self.loader(self.folder)
            prefix, ids = verdict_token_ids(tok, self.verdicts, str(self.folder))
            for v, i in zip([v for v in self.verdicts if v], ids, strict=True):
                if not i:
                    raise SourceError(f"judge model {self.folder}: no single token for {v!r}")
            self._loaded = (model, tok, prefix, ids)
        return self._loaded

    def prob_a(self, prompts: Sequence[str], system: str | None = None) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        from pipeline.lm.scoring import forward_kept

        model, tok, prefix, cand = self._load()
        head = [{"role": "system", "content": system}] if system else []
        seqs = []
        for text in prompts:
            ids = list(tok.apply_chat_template([*head, {"role": "user", "content": text}], tokenize=True,
                                               return_dict=True, add_generation_prompt=True)["input_ids"])
            ids += prefix
            if len(ids) > self.p.max_length:
                log.warning("judge prompt of %d tokens cut to its last %d", len(ids), self.p.max_length)
                ids = ids[-self.p.max_length:]
            seqs.append(ids)
        out: list[float] = [0.0] * len(seqs)
        model.eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # In token order, the two orders of one pair are neighbours: a batch then encodes the template's head
        # and the shared instruction once (pipeline.lm.scoring.forward_kept), and only the last position's
        # logits, the verdict's, are projected onto the vocabulary.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        bs = self.p.batch_size
        with torch.inference_mode():
            for k in tqdm(range(0, len(order), bs), desc="judge (local)", unit="batch"):
                idx = order[k:k + bs]
                rows = forward_kept(model, [seqs[i] for i in idx], [[len(seqs[i]) - 1] for i in idx], pad_id=pad)
                probs = torch.softmax(torch.cat(rows), dim=-1)
                pa, pb = probs[:, cand[0]].sum(-1), probs[:, cand[1]].sum(-1)
                pt = probs[:, cand[2]].sum(-1) if len(cand) > 2 else torch.zeros_like(pa)
                for i, v in zip(idx, ((pa + pt / 2) / (pa + pb + pt)).tolist(), strict=True):
                    out[i] = v
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


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint as a judge."""

    def __init__(self, p: OpenAIJudgeParams, verdicts: tuple[str, str, str | None] = ("A", "B", None)):
        from openai import OpenAI

        self.p, self.verdicts = p, verdicts
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
        if verdicts != ("A", "B", None):
            self.id["verdicts"] = list(verdicts)
        self.unparsed = 0
        self.snapshots: list[str | None] = []
        self.unparsed_flags: list[bool] = []  # per prompt of the last `prob_a` call: no verdict in the reply

    def _one(self, prompt: str, system: str | None = None) -> float:
        import openai

        head = [{"role": "system", "content": system}] if system else []
        kwargs: dict[str, Any] = {"model": self.p.model, "messages": [*head, {"role": "user", "content": prompt}],
                                  "temperature": 0.0, "max_tokens": self.p.max_tokens}
        letters = self.verdicts[:2] == LETTERS  # log-probs of one letter are a soft verdict; "[[A]]" is not one token
        if self.p.logprobs and letters:
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
        p = _prob_from_logprobs(choice) if letters else None
        if p is None:
            p = parse_verdict((choice.message.content or "").strip(), self.verdicts)
        self.unparsed_flags.append(p is None)
        if p is not None:
            return p
        self.unparsed += 1
        log.warning("judge reply has no verdict %s, counted as a tie: %r", list(self.verdicts),
                    (choice.message.content or "")[:80])
        return 0.5

    def prob_a(self, prompts: Sequence[str], system: str | None = None) -> list[float]:
        from tqdm.auto import tqdm

        self.snapshots, self.unparsed_flags = [], []
        return [self._one(p, system) for p in tqdm(prompts, desc=f"judge ({self.p.model})", unit="req")]


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
    return LocalJudge(p.local, folder, sha256_of(folder), loader, verdicts=p.verdicts.as_tuple())


def make_openai_judge(p: JudgeParams, **_: Any) -> OpenAIJudge:
    return OpenAIJudge(p.openai, verdicts=p.verdicts.as_tuple())


JUDGES: dict[str, Callable[..., Judge]] = {"local": make_local_judge, "openai": make_openai_judge}


def blank_rule(x: str, y: str) -> float | None:
    """P(x better) fixed without asking the judge: a blank answer loses to a non-blank one, two blank
    answers tie. None when both have content. (An empty answer is a failed answer, whoever judges.)"""
    bx, by = not x.strip(), not y.strip()
    if bx and by:
        return 0.5
    if bx or by:
        return 0.0 if bx else 1.0
    return None


def judge_pairs(judge: Judge, template: Template, pairs: Sequence[tuple[str, str, str]],
                cache: EvalCache, outcome: dict[str, Any] | None = None) -> list[tuple[float, float]]:
    """For each (instruction, x, y): (P(x better) shown as A, P(x better) shown as B).

    Judgments already in `cache` are not asked again; only the missing ones go to the judge. For a remote
    judge an entry counts only if the snapshot that answered it is the one answering now. A pair with a
    blank side is decided by `blank_rule` and never sent to the judge.

    `outcome`, when given, receives `by_rule` (per pair: settled by `blank_rule`, not by the judge) and
    `unparsed` (judgments used, cached or fresh, whose reply held no verdict). Each cache entry stores
    whether its reply was parsed, so the count is the same with a cold cache and a warm one.
    """
    from pipeline.core.fingerprint import code_part

    code = code_part("pipeline.eval.judges")
    keys, prompts = [], []
    fill = {"placeholders": list(template.placeholders)} if template.placeholders != PLACEHOLDERS else {}
    for instruction, x, y in pairs:
        for a, b in ((x, y), (y, x)):
            keys.append({"judge": judge.id, "template": template.sha256, "instruction": text_sha(instruction),
                         "a": text_sha(a), "b": text_sha(b), "code": code, **fill})
            prompts.append(template.fill(instruction, a, b))
    fixed = [blank_rule(a, b) for _, x, y in pairs for a, b in ((x, y), (y, x))]
    entries: list[Any] = [None if f is not None else cache.get("judgment", k) for f, k in zip(fixed, keys, strict=True)]
    entries = [e if isinstance(e, dict) and "p" in e and "unparsed" in e else None for e in entries]
    remote = hasattr(judge, "snapshots")
    askable = [i for i, f in enumerate(fixed) if f is None]
    todo = [i for i in askable if entries[i] is None]
    if remote and not todo and askable:
        todo = [askable[0]]  # one request shows which snapshot answers the alias now
    current: str | None = None
    for _ in range(2):  # new answers; then, once the snapshot is known, entries from another one
        if todo:
            asked = [prompts[i] for i in todo]
            fresh = judge.prob_a(asked, system=template.system) if template.system else judge.prob_a(asked)
            answered = list(getattr(judge, "snapshots", [])) or [None] * len(todo)
            failed = list(getattr(judge, "unparsed_flags", [])) or [False] * len(todo)  # a local judge always reads P(A)
            for i, v, snap, bad in zip(todo, fresh, answered, failed, strict=True):
                entries[i] = {"p": float(v), "snapshot": snap, "unparsed": bool(bad)}
                cache.put("judgment", keys[i], entries[i])
            current = answered[-1]
        if not remote:
            break
        todo = [i for i in askable if entries[i]["snapshot"] != current]
        if todo:
            log.info("judge %s is answered by snapshot %s now: re-judging %d verdicts from other snapshots",
                     judge.id.get("model"), current, len(todo))
            cache.misses["judgment"] += len(todo)
            cache.hits["judgment"] -= len(todo)
    if remote:
        judge.snapshot = current  # what answered; for metrics and lineage
    probs = [f if f is not None else entries[i]["p"] for i, f in enumerate(fixed)]
    if outcome is not None:
        outcome["by_rule"] = [fixed[2 * k] is not None for k in range(len(pairs))]
        outcome["unparsed"] = sum(bool(entries[i]["unparsed"]) for i in askable)
    return [(probs[2 * k], 1.0 - probs[2 * k + 1]) for k in range(len(pairs))]


def verdict(score: float) -> str:
    """A both-orders score for the first response as a label: A, B or tie."""
    return "A" if score > 0.5 else "B" if score < 0.5 else "tie"
