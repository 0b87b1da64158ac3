"""Degenerate answers: per-response measures and the rules that make a response a failed answer.

A verifiable checker only asks whether a constraint holds, so an answer that says nothing useful
can satisfy it: the prompt echoed in lowercase passes "use only lowercase letters", one fixed short
sentence passes "fewer than 40 words" and "no commas". This module measures what a reader would call
no answer at all, and `validity.*` in params.yaml turns each measure into a rule. A response that
breaks any rule is invalid: it fails every instruction in evaluate's headline (and in
`openrelease score`), and `rate` gives it the lowest rating, so it is never the chosen reply of a
pair. IFEval's reference numbers (`ifeval_*` without `_valid`) ignore these rules on purpose.

The measures, per response (words are lowercased `\\w+` runs, as IFEval counts words):
- `words`: the word count. Rule `too_short`: fewer than `min_words`.
- `repetition`: 1 - distinct / all word n-grams (n = `repetition_ngram`, NLTK's `ngrams`); 0 when the
  response has fewer than n words. Rule `repetition`: above `max_repetition`.
- `whole_repeats`: how many times the whole answer is one block of words said over and over (1: not a
  repeat). Rule `repetition` also fires at 2 or more: a short answer said twice has too few n-grams for
  the rate to notice.
- `repeated_sentence`: how often the most frequent sentence or line occurs (compared as lowercased
  words, code blocks left out; a one-word sentence such as "Cheers." counts). Rule `repeated_sentence`: at least `max_sentence_repeats` times; it
  catches a short answer said twice, where the n-gram rate stays low.
- `prompt_copy`: the share of the response's word n-grams (n = `copy_ngram`; 0 for shorter
  responses) that occur in the prompt, case-insensitive. Phrases the prompt's instructions make the
  answer contain (the request to repeat, "My answer is yes.", an end phrase, keywords: `required_texts`)
  are taken out first. Rule `prompt_copy`: at or above
  `max_prompt_copy` (the prompt echoed, in any case, scores 1.0).
- `prompt_words`: the share of the response's words that occur anywhere in the prompt. Rule
  `prompt_copy` also fires when a response of at least `copy_ngram` words uses nothing but the
  prompt's words (`max_prompt_words`: the prompt's keywords shuffled into a "reply").
- `topic_words`: how many of the prompt's topic words the response shares (words of 3+ letters
  outside `INSTRUCTION_WORDS`, the same word up to its ending: "floats" meets "float", "sun" meets "sunny"). Rule
  `off_topic`: a response of at most `off_topic_max_words` words that shares none, such as a few
  words unrelated to the question ("apple river stone." to "Explain why ice floats"). Short, because a
  long answer can stay on topic in other words; a short one that shares nothing rarely does.
- `reused`: how many *other* prompts of the same set got a near-identical response (rapidfuzz's
  normalised Indel similarity of the normalised texts at or above `reuse_similarity`; identical texts
  score 1.0). Rule `reused`: the answer is shared by at least `min_reuse_prompts` prompts in all,
  i.e. one canned answer whatever was asked.
- `ends_finished`: the text ends the way a finished answer ends: terminal punctuation, a closing
  bracket, quote or code fence, a digit, or a word ending a last line of at most `short_line_words`
  words (a list item, a heading, a sign-off); a comma, colon or dash never ends an answer. Rule `unfinished`: the generator says it was cut at max_new_tokens
  (`finished` False), or, when the generator did not say (`finished` None, as for answers scored from
  a file), the text does not end like a finished answer.
- and `empty`: blank after stripping.

Why these libraries: n-grams with NLTK (already the IFEval tokenizer's home), near-identical answers
with rapidfuzz's C++ `process.cdist` (exact pairwise similarity of every response pair: a few
milliseconds for hundreds of answers). datasketch MinHash (used for dataset dedup in `build`) was
compared: it estimates Jaccard over shingles and needs permutations and a threshold band, which is
the right trade for millions of rows, not for one evaluation set, and short answers have too few
shingles for a stable estimate. difflib's SequenceMatcher gives the same ratio in pure Python, about
100x slower.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

RULES = ("empty", "too_short", "repetition", "repeated_sentence", "prompt_copy", "off_topic", "reused", "unfinished")
# Words that say how to answer, not what about: a reply need not repeat them to be on topic.
INSTRUCTION_WORDS = frozenset("""
a an the and or but if of to in on at for with by from as is are was were be been being it its this that these
those i you he she we they me my your our their his her them us do does did not no so than then there here
what which who whom how why when where can could will would shall should may might must have has had just also
very into about over under up down out all any some each more most such only own same too use using write give
make tell explain describe list name answer reply response respond word words sentence sentences letter letters
lowercase uppercase capital capitals paragraph paragraphs bullet bullets point points exactly least fewer less
without include including end ending start starting title short brief please one two three four five six
""".split())

_WORD = re.compile(r"\w+")
# What a finished answer ends with: sentence punctuation, closing brackets and quotes, a code fence
# or markdown emphasis, IFEval's <<title>> and JSON's }; an emoji or other symbol (So) also counts.
_END_CHARS = set(".!?…)]}>\"'”’`*»")
_SENTENCE_BREAK = re.compile(r"\n+|(?<=[.!?])\s+")
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)


@dataclass
class Rules:
    """Thresholds of the rules (params.yaml `validity`); each value's reason is in params.yaml."""

    min_words: int = 2
    repetition_ngram: int = 4
    max_repetition: float = 0.3
    max_sentence_repeats: int = 3
    copy_ngram: int = 3
    max_prompt_copy: float = 0.6
    max_prompt_words: float = 1.0
    off_topic_max_words: int = 12
    short_line_words: int = 4
    reuse_similarity: float = 0.9
    min_reuse_prompts: int = 3

    @classmethod
    def of(cls, params: Any) -> Rules:
        """From a params section (pydantic model or dict) with the same field names."""
        if params is None:
            return cls()
        data = params.model_dump() if hasattr(params, "model_dump") else dict(params)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Verdict:
    """The measures of one response and the rules it breaks (empty list: a valid answer)."""

    words: int
    repetition: float
    whole_repeats: int
    repeated_sentence: int
    prompt_copy: float
    prompt_words: float
    topic_words: int
    reused: int
    ends_finished: bool
    finished: bool | None
    failed: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.failed

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["failed"] = ",".join(self.failed)
        row["valid"] = self.valid
        return row


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(ws: Sequence[str], n: int) -> float:
    """1 - distinct / all n-grams of the word list; 0 with fewer than n words."""
    from nltk.util import ngrams

    grams = list(ngrams(ws, n))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def whole_repeats(ws: Sequence[str]) -> int:
    """m when the word list is one block of at least 2 words repeated m times (else 1)."""
    n = len(ws)
    for k in range(2, n // 2 + 1):
        if n % k == 0 and list(ws[:k]) * (n // k) == list(ws):
            return n // k
    return 1


def repeated_sentence(text: str) -> int:
    """Occurrences of the most frequent sentence or line (split at line breaks and sentence ends),
    compared as lowercased words. Code blocks are left out (code repeats lines by nature), and a
    one-word line counts only as a sentence ("Cheers." nine times), not as a table cell or a number."""
    counts: Counter[str] = Counter()
    for part in _SENTENCE_BREAK.split(_CODE_BLOCK.sub(" ", text)):
        ws = words(part)
        if len(ws) >= 2 or (ws and part.rstrip()[-1:] in ".!?"):
            counts[" ".join(ws)] += 1
    return max(counts.values(), default=0)


def required_texts(instruction_ids: Sequence[str], kwargs: Sequence[dict]) -> list[str]:
    """Phrases the prompt's own instructions make the answer contain (IFEval ids): the request to
    repeat, the fixed answers of `constrained_response`, an end phrase, a postscript marker, keywords,
    a first word. Copying them from the prompt is following the instruction, not copying."""
    from pipeline.constraints.instructions import CONSTRAINED_RESPONSES

    out: list[str] = []
    for iid, kw in zip(instruction_ids, kwargs, strict=True):
        kw = kw or {}
        if iid == "detectable_format:constrained_response":
            out += list(CONSTRAINED_RESPONSES)
        for key in ("prompt_to_repeat", "end_phrase", "postscript_marker", "keyword", "first_word"):
            if isinstance(kw.get(key), str):
                out.append(kw[key])
        out += [k for k in kw.get("keywords") or [] if isinstance(k, str)]
    return out


def without_phrases(ws: Sequence[str], phrases: Sequence[str]) -> list[str]:
    """The word list with every occurrence of each phrase's words taken out."""
    out = list(ws)
    for phrase in sorted(phrases, key=len, reverse=True):
        pw = words(phrase)
        if not pw:
            continue
        i, kept = 0, []
        while i < len(out):
            if out[i: i + len(pw)] == pw:
                i += len(pw)
            else:
                kept.append(out[i])
                i += 1
        out = kept
    return out


def prompt_copy(ws: Sequence[str], prompt: str, n: int) -> float:
    """Share of the response's word n-grams found in the prompt; 0 for responses shorter than n words
    (a one- or two-word reply naming a word of the question is a short answer, not a copy)."""
    from nltk.util import ngrams

    if len(ws) < n:
        return 0.0
    mine = list(ngrams(ws, n))
    theirs = set(ngrams(words(prompt), n))
    return sum(g in theirs for g in mine) / len(mine)


def prompt_words(ws: Sequence[str], prompt: str) -> float:
    """Share of the response's words found anywhere in the prompt."""
    if not ws:
        return 0.0
    pw = set(words(prompt))
    return sum(w in pw for w in ws) / len(ws)


def _topic(ws: Sequence[str]) -> set[str]:
    return {w for w in ws if len(w) > 2 and not w.isdigit() and w not in INSTRUCTION_WORDS}


def _related(a: str, b: str) -> bool:
    """Same word up to its ending: equal first letters over the shorter word's length, at most 5
    ("sun"/"sunny", "floats"/"float", "plants"/"plant")."""
    k = min(len(a), len(b), 5)
    return a[:k] == b[:k]


def topic_words(ws: Sequence[str], prompt: str) -> int | None:
    """How many of the prompt's topic words the response shares (None: the prompt has none)."""
    mine = _topic(words(prompt))
    if not mine:
        return None
    theirs = _topic(ws)
    return sum(any(_related(m, t) for t in theirs) for m in mine)


def ends_finished(text: str, short_line_words: int = 4) -> bool:
    """True when the stripped text ends like a finished answer: terminal punctuation, a closing
    bracket, quote or fence, a symbol (emoji), a digit or %, or a word ending a short last line (a
    list item, heading or sign-off of at most `short_line_words` words)."""
    t = text.rstrip()
    if not t:
        return False
    last = t[-1]
    if last in _END_CHARS or last.isdigit() or last == "%" or unicodedata.category(last) == "So":
        return True
    if not last.isalpha():
        return False  # a comma, colon, dash or opening bracket: the sentence goes on
    return len(words(t.splitlines()[-1])) <= short_line_words


def _normalised(text: str) -> str:
    return " ".join(words(text))


def reuse_counts(responses: Sequence[str], groups: Sequence[str], similarity: float) -> list[int]:
    """For each response, how many other groups (prompts) have a near-identical non-empty response."""
    from rapidfuzz import fuzz, process

    norm = [_normalised(r) for r in responses]
    idx = [i for i, t in enumerate(norm) if t]
    out = [0] * len(responses)
    if len(idx) < 2:
        return out
    texts = [norm[i] for i in idx]
    scores = process.cdist(texts, texts, scorer=fuzz.ratio, score_cutoff=similarity * 100, workers=1)
    for a, i in enumerate(idx):
        others = {groups[idx[b]] for b in scores[a].nonzero()[0]}
        others.discard(groups[i])
        out[i] = len(others)
    return out


def assess(prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool | None] | None = None,
           rules: Rules | None = None, groups: Sequence[str] | None = None,
           required: Sequence[Sequence[str]] | None = None) -> list[Verdict]:
    """Measure every response of one set and apply the rules.

    `prompts[i]` is the user request `responses[i]` answers; `groups[i]` names the prompt (defaults to
    the prompt text), so several samples of one prompt are not counted as reuse across prompts.
    `finished[i]` is the generator's own word on being cut (None: unknown, judge by the text).
    `required[i]`: phrases prompt i's instructions make the answer contain (`required_texts`): taken
    out before the copy measures, since copying them is following the instruction.
    """
    rules = rules or Rules()
    n = len(responses)
    finished = list(finished) if finished is not None else [None] * n
    groups = list(groups) if groups is not None else list(prompts)
    repeat = [list(r) for r in required] if required is not None else [[] for _ in range(n)]
    if not (len(prompts) == len(finished) == len(groups) == len(repeat) == n):
        raise ValueError("prompts, responses, finished and groups must have one entry per response")
    reuse = reuse_counts(responses, groups, rules.reuse_similarity)
    out = []
    for prompt, text, fin, shared, rep in zip(prompts, responses, finished, reuse, repeat, strict=True):
        ws = words(text)
        own = without_phrases(ws, rep) if rep else ws  # what the answer says beyond the required phrases
        v = Verdict(words=len(ws), repetition=round(repetition(ws, rules.repetition_ngram), 4),
                    whole_repeats=whole_repeats(ws),
                    repeated_sentence=repeated_sentence(text),
                    prompt_copy=round(prompt_copy(own, prompt, rules.copy_ngram), 4),
                    prompt_words=round(prompt_words(own, prompt), 4), topic_words=topic_words(ws, prompt), reused=shared,
                    ends_finished=ends_finished(text, rules.short_line_words), finished=fin)
        if not text.strip():
            v.failed.append("empty")
        else:
            if v.words < rules.min_words:
                v.failed.append("too_short")
            if v.repetition > rules.max_repetition or v.whole_repeats >= 2:
                v.failed.append("repetition")
            if v.repeated_sentence >= rules.max_sentence_repeats:
                v.failed.append("repeated_sentence")
            if v.prompt_copy >= rules.max_prompt_copy or (
                    len(own) >= rules.copy_ngram and v.prompt_words >= rules.max_prompt_words):
                v.failed.append("prompt_copy")
            if v.topic_words == 0 and v.words <= rules.off_topic_max_words:
                v.failed.append("off_topic")
            if shared + 1 >= rules.min_reuse_prompts:
                v.failed.append("reused")
        if fin is False or (fin is None and text.strip() and not v.ends_finished):
            v.failed.append("unfinished")
        out.append(v)
    return out


def rule_rates(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Share of responses breaking each rule, and any rule (`degenerate`)."""
    n = len(verdicts) or 1
    rates = {r: sum(r in v.failed for v in verdicts) / n for r in RULES}
    rates["degenerate"] = sum(not v.valid for v in verdicts) / n
    return rates
