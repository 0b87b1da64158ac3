"""The 25 IFEval instruction checkers, one function each, with the reference's published rules.

Reference: google-research/google-research `instruction_following_eval/instructions.py` and
`instructions_registry.py` (Zhou et al., 2023). Each checker here is `fn(response, **kwargs) -> bool`
and reproduces that class's `check_following` after `build_description(**kwargs)`, including its
quirks, on purpose, so verdicts compare with published IFEval numbers:
- keyword, forbidden-word, postscript-marker and section-splitter strings are used as regular
  expressions unescaped (`keywords:existence` is a substring search, not a whole-word one);
- `detectable_content:postscript` with "P.S." matches "p.s." anywhere in a line, not only at its start;
- `change_case:english_*` pass when langdetect cannot decide (e.g. a response of only digits);
- `length_constraints:number_paragraphs` splits on `***` dividers only, not on blank lines.
The empty-response rule (an all-whitespace response fails every instruction) is the evaluation
loop's, in `pipeline.constraints.ifeval`.

Where the reference would draw a random value (a kwarg missing or out of range), this module does
not guess: `kwargs_problem` names the problem, and callers refuse the row.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from typing import Any

from pipeline.constraints import text

RELATIONS = ("less than", "at least")
LANGUAGE_CODES = ("en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta",
                  "te", "bg", "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(n: int, relation: str, threshold: int) -> bool:
    return n < threshold if relation == "less than" else n >= threshold


def _language_is(value: str, code: str) -> bool:
    from langdetect import LangDetectException

    try:
        return text.detect_language(value) == code
    except LangDetectException:
        return True  # the reference counts an undecidable language as followed


def response_language(value: str, *, language: str) -> bool:
    return _language_is(value, language)


def number_sentences(value: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(text.count_sentences(value), relation, num_sentences)


def number_placeholders(value: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= num_placeholders


def number_bullet_lists(value: str, *, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(value: str) -> bool:
    value = value.strip()
    return any(option in value for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(value: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(value: str, *, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", value)
    return len(parts) - 1 >= num_sections


def number_paragraphs(value: str, *, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", value)
    found = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                found -= 1
            else:
                return False  # an empty paragraph between two dividers
    return found == num_paragraphs


def postscript(value: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def existence(value: str, *, keywords: list[str]) -> bool:
    return all(re.search(k, value, flags=re.IGNORECASE) for k in keywords)


def frequency(value: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(keyword.strip(), value, flags=re.IGNORECASE)), relation, frequency)


def number_words(value: str, *, num_words: int, relation: str) -> bool:
    return _compare(text.count_words(value), relation, num_words)


def json_format(value: str) -> bool:
    value = (value.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
             .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def nth_paragraph_first_word(value: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = re.split(r"\n\n", value)
    found = len(parts) - sum(not p.strip() for p in parts)
    if nth_paragraph > found:
        return False
    paragraph = parts[nth_paragraph - 1].strip()  # the reference indexes the raw split, empty parts included
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first += ch.lower()
    return found == num_paragraphs and first == first_word.lower()


def forbidden_words(value: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + w + r"\b", value, flags=re.IGNORECASE) for w in set(forbidden_words))


def two_responses(value: str) -> bool:
    parts = value.split("******")
    kept = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part)
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def repeat_prompt(value: str, *, prompt_to_repeat: str) -> bool:
    return value.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(value: str, *, end_phrase: str) -> bool:
    return value.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def title(value: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


def letter_frequency(value: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(collections.Counter(value.lower())[letter.strip().lower()], let_relation, let_frequency)


def english_capital(value: str) -> bool:
    return value.isupper() and _language_is(value, "en")


def english_lowercase(value: str) -> bool:
    return value.islower() and _language_is(value, "en")


def no_comma(value: str) -> bool:
    return "," not in value


def capital_word_frequency(value: str, *, capital_frequency: int, capital_relation: str) -> bool:
    capitals = sum(w.isupper() for w in text.word_tokenize(value))
    return _compare(capitals, capital_relation, capital_frequency)


def quotation(value: str) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# id -> (checker, {kwarg: kind}); every kwarg listed is required (the reference would pick a random
# value for a missing one). Kinds: count (int >= 0), pos (int >= 1), relation, language, letter,
# text (non-blank string), regex (non-blank string that compiles), regexes (non-empty list of those).
CHECKERS: dict[str, tuple[Callable[..., bool], dict[str, str]]] = {
    "keywords:existence": (existence, {"keywords": "regexes"}),
    "keywords:frequency": (frequency, {"keyword": "regex", "frequency": "count", "relation": "relation"}),
    "keywords:forbidden_words": (forbidden_words, {"forbidden_words": "regexes"}),
    "keywords:letter_frequency": (letter_frequency, {"letter": "letter", "let_frequency": "count", "let_relation": "relation"}),
    "language:response_language": (response_language, {"language": "language"}),
    "length_constraints:number_sentences": (number_sentences, {"num_sentences": "count", "relation": "relation"}),
    "length_constraints:number_paragraphs": (number_paragraphs, {"num_paragraphs": "count"}),
    "length_constraints:number_words": (number_words, {"num_words": "count", "relation": "relation"}),
    "length_constraints:nth_paragraph_first_word": (
        nth_paragraph_first_word, {"num_paragraphs": "count", "nth_paragraph": "pos", "first_word": "text"}),
    "detectable_content:number_placeholders": (number_placeholders, {"num_placeholders": "count"}),
    "detectable_content:postscript": (postscript, {"postscript_marker": "regex"}),
    "detectable_format:number_bullet_lists": (number_bullet_lists, {"num_bullets": "count"}),
    "detectable_format:constrained_response": (constrained_response, {}),
    "detectable_format:number_highlighted_sections": (number_highlighted_sections, {"num_highlights": "count"}),
    "detectable_format:multiple_sections": (multiple_sections, {"section_spliter": "regex", "num_sections": "count"}),
    "detectable_format:json_format": (json_format, {}),
    "detectable_format:title": (title, {}),
    "combination:two_responses": (two_responses, {}),
    "combination:repeat_prompt": (repeat_prompt, {"prompt_to_repeat": "text"}),
    "startend:end_checker": (end_checker, {"end_phrase": "text"}),
    "change_case:capital_word_frequency": (
        capital_word_frequency, {"capital_frequency": "count", "capital_relation": "relation"}),
    "change_case:english_capital": (english_capital, {}),
    "change_case:english_lowercase": (english_lowercase, {}),
    "punctuation:no_comma": (no_comma, {}),
    "startend:quotation": (quotation, {}),
}


def _value_problem(name: str, kind: str, v: Any) -> str | None:
    if kind in ("count", "pos"):
        lowest = 0 if kind == "count" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
            return f"{name} must be an integer >= {lowest}, got {v!r}"
    elif kind == "relation":
        if v not in RELATIONS:
            return f"{name} must be one of {list(RELATIONS)}, got {v!r}"
    elif kind == "language":
        if v not in LANGUAGE_CODES:
            return f"{name} must be one of IFEval's {len(LANGUAGE_CODES)} ISO 639-1 codes, got {v!r}"
    elif kind == "letter":
        if not isinstance(v, str) or len(v) != 1 or not v.strip():
            return f"{name} must be a single character, got {v!r}"
    elif kind == "regexes":
        if not isinstance(v, list) or not v:
            return f"{name} must be a non-empty list of strings, got {v!r:.80}"
        for i, item in enumerate(v):
            if problem := _value_problem(f"{name}[{i}]", "regex", item):
                return problem
    elif not isinstance(v, str) or not v.strip():
        return f"{name} must be a non-blank string, got {v!r:.80}"
    elif kind == "regex":
        try:
            re.compile(v.strip())
        except re.error as e:
            return f"{name} is used as a regular expression (as IFEval does) and does not compile: {e}"
    return None


def kwargs_problem(instruction_id: Any, kwargs: Any) -> str | None:
    """Why `kwargs` cannot be checked for `instruction_id`, or None when they are complete and valid."""
    if instruction_id not in CHECKERS:
        return f"unknown instruction id {instruction_id!r} (IFEval has {len(CHECKERS)}; e.g. punctuation:no_comma)"
    if not isinstance(kwargs, dict):
        return f"{instruction_id}: kwargs must be an object, got {type(kwargs).__name__}"
    spec = CHECKERS[instruction_id][1]
    if extra := sorted(set(kwargs) - set(spec)):
        return f"{instruction_id}: unknown kwarg(s) {extra} (allowed: {sorted(spec) or 'none'})"
    if missing := sorted(set(spec) - set(kwargs)):
        return f"{instruction_id}: missing kwarg(s) {missing} (IFEval would draw them at random)"
    for name in sorted(spec):
        if problem := _value_problem(name, spec[name], kwargs[name]):
            return f"{instruction_id}: {problem}"
    if instruction_id == "length_constraints:nth_paragraph_first_word" and kwargs["nth_paragraph"] > kwargs["num_paragraphs"]:
        return f"{instruction_id}: nth_paragraph {kwargs['nth_paragraph']} is greater than num_paragraphs {kwargs['num_paragraphs']}"
    return None
