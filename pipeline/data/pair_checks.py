"""The built-pairs suite: facts about each DPO pair, the GX expectations over them, and token counting.

Run by `build` on the pairs it made, before it writes them, so the dataset on disk is one that passed
(validate checks rows; a rule about pairs, such as the split or the token budget, only exists after
build). Rules: required_columns, text_not_blank, chosen_differs, token_length, unique_ids,
prompts_disjoint_across_splits; each is `fail` or `quarantine` in params `validate.pairs`.

Token lengths are those TRL's DPOTrainer sees for conversational data: the chat template of the base
model applied to prompt + chosen (and prompt + rejected), tokenized without extra special tokens.
Rendering and tokenizing every conversation costs ~0.3 ms, so it is done only where it matters:
1. an upper bound (UTF-8 bytes of the contents + the template's bytes, measured on probe conversations,
   + a margin per message) proves a pair fits: a token never covers less than one byte of the rendered
   text, except a SentencePiece word-start marker (the margin);
2. otherwise an estimate: the tokens of each content on its own plus the template's tokens, again
   measured on probes; a content's tokens are summed over its pre-tokens, each tokenized once and
   cached (BPE never merges across pre-tokens), for byte-level BPE tokenizers whose pre-token split
   this module reproduces; a sample of every batch is checked against the tokenizer and any difference
   turns the cache off;
3. a pair whose estimate is within a band of max_length (32 tokens + 4 per message: merges across the
   template's boundaries change a count by a token or two) is rendered and tokenized exactly.
If the template does not behave linearly on the probes, every pair is counted exactly.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.io import atomic_write_json
from pipeline.core.params import ValidateParams
from pipeline.data.formats.common import excerpt
from pipeline.data.validation import decide, run_suite

log = logging.getLogger(__name__)

COLUMNS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "source", "source_row",
           "rule", "prompt_hash")
# Whether a reply was cut at max_new_tokens: true / false, or null where the source does not say (so
# not among the not-null contract columns above). Written beside them into every split.
CUT_COLUMNS = ("chosen_cut", "rejected_cut")
SPLIT_COLUMNS = (*COLUMNS[:4], *CUT_COLUMNS, *COLUMNS[4:])
MARGIN_PER_MESSAGE, MARGIN = 2, 8
BAND_PER_MESSAGE, BAND = 4, 32


class TokenCounter:
    """Token length of conversations after the chat template, exact whenever it could exceed the limit."""

    def __init__(self, tokenizer_dir: str | Path, max_length: int) -> None:
        from pipeline.lm.loading import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.backend = getattr(self.tok, "backend_tokenizer", None)
        self.max_length = max_length
        self.stats = Counter()
        self._bytes = self._probe(lambda t: len(t.encode()))
        self._tokens = self._probe(lambda t: self.lengths([t])[0])
        self._pretokens = PretokenCounter.for_tokenizer(self.backend)

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def lengths(self, texts: list[str]) -> list[int]:
        """Token count of each text on its own (no special tokens added)."""
        if not texts:
            return []
        if self.backend is not None:
            return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def _probe(self, size) -> dict[str, int] | None:
        """What the template adds, in `size` units: a base (with / without a leading system turn, covering
        the first user/assistant exchange) and one per further exchange; None if it is not linear."""
        def extra(msgs: list[dict]) -> int:
            return size(self._render(msgs)) - sum(size(m["content"]) for m in msgs)

        u, a = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
        s = {"role": "system", "content": "Be brief"}
        try:
            base = {"none": extra([u, a]), "system": extra([s, u, a])}
            per = extra([u, a, u, a]) - base["none"]
            longer = [{"role": m["role"], "content": " ".join([m["content"]] * 40)} for m in (s, u, a, u, a)]
            linear = extra([s, u, a, u, a]) == base["system"] + per and extra(longer) == base["system"] + per
        except Exception as e:  # noqa: BLE001 - any template failure means "count everything exactly"
            log.warning("chat template probe failed (%s); every pair is tokenized exactly", e)
            return None
        if not linear:
            log.warning("chat template is not linear in its contents; every pair is tokenized exactly")
            return None
        return {"none": base["none"], "system": base["system"], "per": max(per, 0)}

    def count_table(self, prompt, chosen, rejected) -> np.ndarray:
        """Per pair (Arrow list<struct<role, content>> columns), the larger token count of prompt+chosen and
        prompt+rejected, or a bound proving both fit in max_length."""
        n = len(prompt)
        p_bytes, p_msgs, p_sys = _per_row(prompt, n, _utf8_bytes)
        completions = (chosen, rejected)
        counts = np.full((2, n), -1, dtype=np.int64)
        msgs, todo = [], []
        for k, completion in enumerate(completions):
            c_bytes, c_msgs, _ = _per_row(completion, n, _utf8_bytes)
            msgs.append(p_msgs + c_msgs)
            todo.append(np.arange(n))
            if self._bytes is not None:
                bound = (p_bytes + c_bytes + _overhead_v(self._bytes, p_sys, msgs[k], safe=True) + MARGIN
                         + MARGIN_PER_MESSAGE * msgs[k])
                fits = bound <= self.max_length
                counts[k, fits] = bound[fits]
                todo[k] = np.flatnonzero(~fits)
                self.stats["byte_bound"] += int(fits.sum())
        if self._tokens is not None and (len(todo[0]) or len(todo[1])):
            need = np.union1d(todo[0], todo[1])
            p_tok = np.zeros(n, dtype=np.int64)
            p_tok[need] = _per_row(prompt.take(pa.array(need)), len(need), self._content_tokens)[0]
            for k, completion in enumerate(completions):
                t = todo[k]
                c_tok = _per_row(completion.take(pa.array(t)), len(t), self._content_tokens)[0]
                est = p_tok[t] + c_tok + _overhead_v(self._tokens, p_sys[t], msgs[k][t])
                band = BAND + BAND_PER_MESSAGE * msgs[k][t]
                sure = (est + band < self.max_length) | (est - band > self.max_length)
                counts[k, t[sure]] = est[sure]
                self.stats["estimated"] += int(sure.sum())
                todo[k] = t[~sure]
        for k, completion in enumerate(completions):
            t = todo[k]
            if len(t):
                convs = [[*a, *b] for a, b in zip(prompt.take(pa.array(t)).to_pylist(),
                                                  completion.take(pa.array(t)).to_pylist(), strict=True)]
                counts[k, t] = self.lengths([self._render(c) for c in convs])
                self.stats["exact"] += len(t)
        return counts.max(axis=0)

    def _content_tokens(self, contents) -> np.ndarray:
        """Token count of each content on its own (for estimates): through the pre-token cache when it
        reproduces this tokenizer, else the tokenizer itself."""
        texts = [t or "" for t in contents.to_pylist()]
        unique = list(dict.fromkeys(texts))
        if self._pretokens is not None:
            fast = self._pretokens.count(unique)
            checked = unique[:: max(1, len(unique) // 16)]  # keep checking a sample against the tokenizer
            if [fast[i] for i in range(0, len(unique), max(1, len(unique) // 16))] != self.lengths(checked):
                log.warning("pre-token counts differ from the tokenizer's; counting with the tokenizer from now on")
                self._pretokens = None
            else:
                n = dict(zip(unique, fast, strict=True))
                return np.array([n[t] for t in texts], dtype=np.int64)
        n = dict(zip(unique, self.lengths(unique), strict=True))
        return np.array([n[t] for t in texts], dtype=np.int64)


# The pre-tokenizer regex of GPT-2-style byte-level BPE (tokenizers' ByteLevel with use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class PretokenCounter:
    """Token counts of byte-level BPE texts as the sum over their pre-tokens, each counted once by the
    tokenizer and cached: BPE never merges across pre-tokens, so the sum is exact when the pre-token split
    is the tokenizer's (TokenCounter keeps checking samples against the tokenizer). Used only for
    tokenizers without a normalizer whose pre-tokenizer is ByteLevel with its GPT-2 regex, or a regex
    Split followed by ByteLevel without one (Llama 3 / Qwen style)."""

    def __init__(self, pattern: str, backend) -> None:
        import regex

        self.re, self.backend = regex.compile(pattern), backend
        self.cache: dict[str, int] = {}
        # Added tokens (<|im_end|>, ...) inside a text are split off by the tokenizer first: such texts
        # are left to the tokenizer.
        added = sorted((t.content for t in backend.get_added_tokens_decoder().values()), key=len, reverse=True)
        self.added = regex.compile("|".join(regex.escape(a) for a in added)) if added else None

    @classmethod
    def for_tokenizer(cls, backend) -> PretokenCounter | None:
        import json

        try:
            import regex  # noqa: F401 - a transformers dependency; without it, no fast path
        except ImportError:
            return None
        if backend is None:
            return None
        cfg = json.loads(backend.to_str())
        model, pre = cfg.get("model") or {}, cfg.get("pre_tokenizer") or {}
        if cfg.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
            return None
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            return cls(GPT2_PATTERN, backend)
        steps = pre.get("pretokenizers") or []
        if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
                and "Regex" in (steps[0].get("pattern") or {}) and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            return cls(steps[0]["pattern"]["Regex"], backend)
        return None

    def count(self, texts: list[str]) -> list[int]:
        pieces = [self.re.findall(t) for t in texts]
        missing = list({p for ps in pieces for p in ps if p not in self.cache})
        if missing:
            for p, e in zip(missing, self.backend.encode_batch(missing, add_special_tokens=False), strict=True):
                self.cache[p] = len(e.ids)
        out = []
        for t, ps in zip(texts, pieces, strict=True):
            if sum(map(len, ps)) != len(t) or (self.added is not None and self.added.search(t)):
                out.append(len(self.backend.encode(t, add_special_tokens=False).ids))
            else:
                out.append(sum(self.cache[p] for p in ps))
        if len(self.cache) > 2_000_000:
            self.cache.clear()
        return out


def _utf8_bytes(contents) -> np.ndarray:
    return pc.binary_length(pc.fill_null(contents, "")).to_numpy(zero_copy_only=False).astype(np.int64)


def _per_row(messages, n: int, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a list<struct<role, content>> array: per row the summed `size` of the contents, the number of
    messages, and whether the first message is a system turn."""
    flat = pc.list_flatten(messages)
    parent = pc.list_parent_indices(messages).to_numpy()
    total = np.bincount(parent, weights=size(flat.field("content")), minlength=n).astype(np.int64)
    count = pc.fill_null(pc.list_value_length(messages), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    roles = flat.field("role").to_numpy(zero_copy_only=False)
    first = np.zeros(n, dtype=bool)
    starts = np.searchsorted(parent, np.arange(n))
    has = count > 0
    first[has] = roles[starts[has]] == "system"
    return total, count, first


def _overhead_v(model: dict[str, int], has_system: np.ndarray, messages: np.ndarray, safe: bool = False) -> np.ndarray:
    """Vectorised TokenCounter._overhead."""
    further = np.maximum((messages - has_system + 1) // 2 - 1, 0) + int(safe)
    return np.where(has_system, model["system"], model["none"]) + model["per"] * further


def pair_facts(batch, counter: TokenCounter | None) -> dict[str, list]:
    """Facts for an Arrow batch of pairs; light stand-ins keep the contract column names (a list column
    becomes its length), so a missing or null column shows under its own name in the Data Docs."""
    n = batch.num_rows
    facts: dict[str, list] = {}
    for c in (*COLUMNS, *CUT_COLUMNS):
        if c in batch.column_names:
            col = batch.column(c).combine_chunks()
            facts[c] = (pc.list_value_length(col) if pa.types.is_list(col.type) else col).to_pylist()
    texts = [batch.column(c).combine_chunks() if c in batch.column_names else None
             for c in ("prompt", "chosen", "rejected")]
    shortest = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    for col in texts:
        if col is None:
            shortest[:] = 0
            continue
        flat = pc.list_flatten(col)
        lengths = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(flat.field("content"), "")))
        np.minimum.at(shortest, pc.list_parent_indices(col).to_numpy(), lengths.to_numpy(zero_copy_only=False))
        empty = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False) == 0
        shortest[empty] = 0
    facts["text_min_chars"] = shortest.tolist()
    if texts[1] is not None and texts[2] is not None:
        facts["chosen_differs"] = _differs(texts[1], texts[2])
    else:
        facts["chosen_differs"] = [False] * n
    if counter is not None and all(t is not None for t in texts):
        facts["tokens_max"] = counter.count_table(*texts).tolist()
    else:
        facts["tokens_max"] = [0] * n
    return facts


def _differs(chosen, rejected) -> list[bool]:
    """Whether chosen and rejected texts differ (whitespace at the ends ignored)."""
    def lengths(col):
        return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)

    if (lengths(chosen) == 1).all() and (lengths(rejected) == 1).all():  # the usual case, vectorised
        def text(col):
            return pc.utf8_trim_whitespace(pc.fill_null(pc.list_flatten(col).field("content"), ""))
        return pc.not_equal(text(chosen), text(rejected)).to_pylist()

    def joined(messages):
        return " ".join((m.get("content") or "") for m in (messages or [])).strip()
    return [joined(c) != joined(r) for c, r in zip(chosen.to_pylist(), rejected.to_pylist(), strict=True)]


def split_overlap(prompt_hashes: list[str], splits: list[str]) -> list[bool]:
    """True for each pair whose prompt hash also occurs in another split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for h, s in zip(prompt_hashes, splits, strict=True):
        seen[h].add(s)
    return [len(seen[h]) > 1 for h in prompt_hashes]


def expectations(frame_columns: list[str], max_length: int) -> dict[str, list]:
    import great_expectations.expectations as gxe

    present = [c for c in COLUMNS if c in frame_columns]
    return {
        "required_columns": [gxe.ExpectColumnToExist(column=c) for c in (*COLUMNS, *CUT_COLUMNS)]
        + [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in present]
        # a cut flag is true, false or null (unknown); GX leaves nulls out of this check
        + [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True, False]) for c in CUT_COLUMNS
           if c in frame_columns],
        "text_not_blank": [gxe.ExpectColumnValuesToBeBetween(column="text_min_chars", min_value=1)],
        "chosen_differs": [gxe.ExpectColumnValuesToBeInSet(column="chosen_differs", value_set=[True])],
        "token_length": [gxe.ExpectColumnValuesToBeBetween(column="tokens_max", max_value=max_length)],
        "unique_ids": [gxe.ExpectColumnValuesToBeUnique(column="id")] if "id" in frame_columns else [],
        "prompts_disjoint_across_splits": [gxe.ExpectColumnValuesToBeInSet(column="in_both_splits",
                                                                           value_set=[False])],
    }


def describer(frame, max_length: int, excerpt_of=None):
    """`describe(i, rule)` for the pairs suite; `excerpt_of(i)` gives a pair's prompt excerpt (lazily:
    only failing pairs need one)."""
    ids = Counter(frame["id"]) if "id" in frame else Counter()

    def describe(i: int, rule: str) -> dict[str, Any]:
        row = frame.iloc[i]
        source_row = str(row.get("source_row") or "?:?")
        path, _, where = source_row.rpartition(":")
        reasons = {
            "required_columns": "a contract column is missing or null",
            "text_not_blank": "blank prompt, chosen or rejected text",
            "chosen_differs": "chosen and rejected texts are identical",
            "token_length": f"~{row.get('tokens_max')} tokens after the chat template > max_length {max_length}",
            "unique_ids": f"pair id {row.get('id')!r} appears {ids.get(row.get('id'), 0)} times",
            "prompts_disjoint_across_splits": f"prompt hash {str(row.get('prompt_hash'))[:12]} is in train and test",
        }
        return {"source": row.get("source") or "?", "id": row.get("id"), "reason": reasons.get(rule, rule),
                "excerpt": excerpt_of(i) if excerpt_of else "", "path": path or "?", "where": where or None}

    return describe


def check_pairs(pairs, counter: TokenCounter | None, v: ValidateParams, report_dir: Path | None,
                report_name: str, batch_size: int):
    """Run the pairs suite over the built pairs (a datasets.Dataset); return (Outcome, facts frame, describe)."""
    import pandas as pd

    cols: dict[str, list] = {}
    for batch in pairs.with_format("arrow").iter(batch_size=batch_size):
        facts = pair_facts(batch, counter)
        facts["split"] = batch.column("split").to_pylist()
        for k, vals in facts.items():
            cols.setdefault(k, []).extend(vals)
    if not cols:
        cols = {c: [] for c in (*COLUMNS, *CUT_COLUMNS, "text_min_chars", "chosen_differs", "tokens_max", "split")}
    cols["in_both_splits"] = split_overlap(cols.get("prompt_hash", []), cols["split"])
    frame = pd.DataFrame(cols)
    actions = v.pairs.model_dump()
    truncate = actions["token_length"] == "truncate"
    if truncate:  # GX knows fail | quarantine; the over-long pairs are then taken out of the decision
        actions["token_length"] = "quarantine"
    results = run_suite("pairs", frame, expectations(list(frame.columns), v.max_length),
                        actions, docs_dir=report_dir / "docs" if report_dir else None)
    truncated = sorted(results.pop("token_length").failed) if truncate else []

    def excerpt_of(i: int) -> str:
        prompt = pairs[int(i)].get("prompt") or [{}]
        return excerpt(prompt[-1].get("content") or "", 60)

    describe = describer(frame, v.max_length, excerpt_of)
    outcome = decide(results, len(frame), v.max_quarantine_fraction, describe, report_name, unit="pairs")
    outcome.truncated = truncated  # left for TRL to truncate (token_length: truncate)
    outcome.report["rules"]["token_length"] = {"action": v.pairs.token_length, "failed_rows": len(truncated)} \
        if truncate else outcome.report["rules"].get("token_length")
    if report_dir is not None:
        outcome.report["data_docs"] = "docs/index.html"
        outcome.report["token_counting"] = dict(counter.stats) if counter else "off (no tokenizer)"
        atomic_write_json(report_dir / "report.json", outcome.report)
    return outcome, frame, describe
