"""Verifiable-instruction checkers in the style of IFEval (Zhou et al., 2023).

Each checker is a small pure function `fn(response, **kwargs) -> (ok, detail)`; `CHECKERS` maps the
constraint type used in the prompt files to it. A constraint is a dict `{"type": name, **kwargs}`.
`check()` scores one response against a prompt's constraints; `validate_constraints()` rejects an
unknown type or bad kwargs with a DataError naming the file and line; `read_prompts()` reads and
validates a whole prompt file.

Counting rules (deliberately simple and documented, so a rating can be re-derived by hand):
- a word is a run of letters/digits, optionally joined by an apostrophe or hyphen ("don't", "well-known");
- a sentence ends at `.`, `!` or `?` followed by whitespace or the end (abbreviations count as ends);
- a bullet is a line starting with `* ` or `- ` (after indentation); `***` is not a bullet;
- paragraphs are separated by blank lines or by a line holding only `***`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError

Result = tuple[bool, str]

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_SEPARATOR_LINE = re.compile(r"^[ \t]*\*\s*\*\s*\*[ \t]*$", re.MULTILINE)
_TITLE = re.compile(r"<<([^<>\n]*\S[^<>\n]*)>>")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\S[^\[\]\n]*\]")
_FENCE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    parts = _SENTENCE_END.split(text.strip())
    return [p for p in parts if _WORD.search(p)]


def _bounds(n: int, lo: int | None, hi: int | None, what: str) -> Result:
    if lo is not None and n < lo:
        return False, f"{n} {what}, fewer than the minimum {lo}"
    if hi is not None and n > hi:
        return False, f"{n} {what}, more than the maximum {hi}"
    return True, f"{n} {what}"


def _find_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, re.IGNORECASE) is not None


def lowercase(response: str) -> Result:
    """Every letter is lowercase (and there is at least one letter)."""
    if not any(c.isalpha() for c in response):
        return False, "no letters"
    upper = sorted({c for c in response if c.isupper()})
    return (not upper), ("all lowercase" if not upper else f"uppercase letters: {''.join(upper[:10])}")


def uppercase(response: str) -> Result:
    """Every letter is uppercase (and there is at least one letter)."""
    if not any(c.isalpha() for c in response):
        return False, "no letters"
    lower = sorted({c for c in response if c.islower()})
    return (not lower), ("all uppercase" if not lower else f"lowercase letters: {''.join(lower[:10])}")


def word_count(response: str, *, min: int | None = None, max: int | None = None) -> Result:  # noqa: A002
    """Number of words within [min, max] (either bound may be absent)."""
    return _bounds(len(words(response)), min, max, "words")


def sentence_count(response: str, *, min: int | None = None, max: int | None = None) -> Result:  # noqa: A002
    """Number of sentences within [min, max]."""
    return _bounds(len(sentences(response)), min, max, "sentences")


def keywords(response: str, *, keywords: list[str]) -> Result:
    """Every keyword appears as a whole word or phrase, case-insensitively."""
    missing = [k for k in keywords if not _find_word(response, k)]
    return (not missing), ("all keywords present" if not missing else f"missing: {', '.join(missing)}")


def forbidden_words(response: str, *, words: list[str]) -> Result:
    """None of the words appears as a whole word, case-insensitively."""
    found = [w for w in words if _find_word(response, w)]
    return (not found), ("none present" if not found else f"found: {', '.join(found)}")


def ends_with(response: str, *, phrase: str) -> Result:
    """The response ends with exactly `phrase` (case-sensitive), ignoring trailing whitespace."""
    tail = response.rstrip()
    ok = tail.endswith(phrase.strip())
    return ok, ("ends with the phrase" if ok else f"ends with {tail[-len(phrase.strip()) - 10:]!r}")


def starts_with(response: str, *, phrase: str) -> Result:
    """The response starts with exactly `phrase` (case-sensitive), ignoring leading whitespace."""
    head = response.lstrip()
    ok = head.startswith(phrase.strip())
    return ok, ("starts with the phrase" if ok else f"starts with {head[: len(phrase.strip()) + 10]!r}")


def bullet_count(response: str, *, n: int) -> Result:
    """Exactly `n` markdown bullets (lines starting with `* ` or `- `)."""
    found = len(_BULLET.findall(response))
    return found == n, f"{found} bullets, expected {n}"


def json_format(response: str) -> Result:
    """The whole response is valid JSON, optionally inside one ```json fence."""
    text = response.strip()
    if m := _FENCE.match(text):
        text = m.group(1).strip()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    return True, "valid JSON"


def no_commas(response: str) -> Result:
    """No comma anywhere."""
    n = response.count(",")
    return n == 0, ("no commas" if n == 0 else f"{n} commas")


def title(response: str) -> Result:
    """A non-blank title in double angle brackets, e.g. <<my title>>."""
    m = _TITLE.search(response)
    return (m is not None), (f"title {m.group(0)!r}" if m else "no <<title>> found")


def paragraphs(response: str, *, n: int) -> Result:
    """Exactly `n` non-empty paragraphs, separated by blank lines or a `***` line."""
    text = _SEPARATOR_LINE.sub("\n", response.strip())
    found = len([p for p in re.split(r"\n[ \t]*\n", text) if p.strip()])
    return found == n, f"{found} paragraphs, expected {n}"


def placeholders(response: str, *, min: int) -> Result:  # noqa: A002
    """At least `min` placeholders in square brackets, such as [address]."""
    found = len(_PLACEHOLDER.findall(response))
    return found >= min, f"{found} placeholders, need at least {min}"


def postscript(response: str, *, marker: str = "P.S.") -> Result:
    """A line that starts with the postscript marker (case-insensitive), e.g. `P.S. see you soon`."""
    ok = re.search(r"^[ \t]*" + re.escape(marker.strip()), response, re.IGNORECASE | re.MULTILINE) is not None
    return ok, (f"has a {marker.strip()} line" if ok else f"no line starting with {marker.strip()!r}")


CHECKERS: dict[str, Callable[..., Result]] = {
    "lowercase": lowercase,
    "uppercase": uppercase,
    "word_count": word_count,
    "sentence_count": sentence_count,
    "keywords": keywords,
    "forbidden_words": forbidden_words,
    "ends_with": ends_with,
    "starts_with": starts_with,
    "bullet_count": bullet_count,
    "json_format": json_format,
    "no_commas": no_commas,
    "title": title,
    "paragraphs": paragraphs,
    "placeholders": placeholders,
    "postscript": postscript,
}

# kwarg name -> (expected kind, lowest allowed int). Names mean the same in every checker.
_KWARGS: dict[str, tuple[str, int]] = {
    "min": ("int", 0), "max": ("int", 0), "n": ("int", 1),
    "keywords": ("words", 0), "words": ("words", 0), "phrase": ("text", 0), "marker": ("text", 0),
}
# kwargs of each checker: (required, optional)
_SIGNATURES: dict[str, tuple[set[str], set[str]]] = {
    "word_count": (set(), {"min", "max"}), "sentence_count": (set(), {"min", "max"}),
    "keywords": ({"keywords"}, set()), "forbidden_words": ({"words"}, set()),
    "ends_with": ({"phrase"}, set()), "starts_with": ({"phrase"}, set()),
    "bullet_count": ({"n"}, set()), "paragraphs": ({"n"}, set()), "placeholders": ({"min"}, set()),
    "postscript": (set(), {"marker"}),
}


def _kwarg_problem(name: str, value: Any) -> str | None:
    kind, lowest = _KWARGS[name]
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be an integer, got {value!r}"
        if value < lowest:
            return f"{name} must be >= {lowest}, got {value}"
    elif kind == "text":
        if not isinstance(value, str) or not value.strip():
            return f"{name} must be a non-blank string, got {value!r}"
    elif not (isinstance(value, list) and value and all(isinstance(w, str) and w.strip() for w in value)):
        return f"{name} must be a non-empty list of non-blank strings, got {value!r}"
    return None


def constraint_problem(c: Any) -> str | None:
    """Why a constraint dict is invalid, or None when it is fine."""
    if not isinstance(c, dict):
        return f"a constraint must be an object, got {type(c).__name__}"
    kind = c.get("type")
    if kind not in CHECKERS:
        return f"unknown constraint type {kind!r} (known: {', '.join(sorted(CHECKERS))})"
    required, optional = _SIGNATURES.get(kind, (set(), set()))
    given = set(c) - {"type"}
    if extra := given - required - optional:
        return f"{kind}: unknown argument(s) {sorted(extra)} (allowed: {sorted(required | optional) or 'none'})"
    if missing := required - given:
        return f"{kind}: missing argument(s) {sorted(missing)}"
    for name in sorted(given):
        if problem := _kwarg_problem(name, c[name]):
            return f"{kind}: {problem}"
    if kind in ("word_count", "sentence_count"):
        lo, hi = c.get("min"), c.get("max")
        if lo is None and hi is None:
            return f"{kind}: needs min, max or both"
        if lo is not None and hi is not None and lo > hi:
            return f"{kind}: min {lo} is greater than max {hi}"
    return None


def validate_constraints(constraints: Any, where: str | Path, line: int | None = None) -> list[dict]:
    """Return `constraints` if it is a non-empty list of valid constraints, else raise DataError at where:line."""
    if not isinstance(constraints, list) or not constraints:
        raise DataError(where, line, "constraints", f"must be a non-empty list, got {constraints!r:.80}")
    for i, c in enumerate(constraints):
        if problem := constraint_problem(c):
            raise DataError(where, line, "constraints", f"constraint {i}: {problem}")
    return constraints


def check(response: str, constraints: list[dict]) -> list[dict]:
    """Per constraint: {"type", "ok", "detail"}, in the order given."""
    validate_constraints(constraints, "<constraints>")
    out = []
    for c in constraints:
        ok, detail = CHECKERS[c["type"]](response, **{k: v for k, v in c.items() if k != "type"})
        out.append({"type": c["type"], "ok": bool(ok), "detail": detail})
    return out


def pass_fraction(results: list[dict]) -> float:
    return sum(r["ok"] for r in results) / len(results) if results else 0.0


def read_prompts(path: str | Path) -> list[dict]:
    """Read a constraint prompt file: `{"id", "prompt", "constraints"}` per line, ids unique.

    Every row is checked; the first bad one raises DataError with its file:line. Each returned row
    also carries its 1-based `line`.
    """
    from pipeline.core.io import iter_jsonl

    rows, seen = [], {}
    for lineno, obj in iter_jsonl(path):
        extra = set(obj) - {"id", "prompt", "constraints"}
        if extra:
            raise DataError(path, lineno, "prompt row keys", f"unknown key(s) {sorted(extra)}; allowed: id, prompt, constraints")
        pid, prompt = obj.get("id"), obj.get("prompt")
        if not isinstance(pid, str) or not pid.strip():
            raise DataError(path, lineno, "id", f"must be a non-blank string, got {pid!r}")
        if pid in seen:
            raise DataError(path, lineno, "unique id", f"{pid!r} already used on line {seen[pid]}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, lineno, "prompt", f"must be a non-blank string, got {prompt!r:.80}")
        validate_constraints(obj.get("constraints"), path, lineno)
        seen[pid] = lineno
        rows.append({**obj, "line": lineno})
    if not rows:
        raise DataError(path, None, "non-empty", "the prompt file has no rows")
    return rows
