"""The verifiable-instruction checkers: one passing and one failing example per checker, bad kwargs."""

from __future__ import annotations

import json

import pytest

from pipeline.constraints.checkers import (
    CHECKERS,
    check,
    read_prompts,
    sentences,
    validate_constraints,
    words,
)
from pipeline.core.errors import DataError

# (constraint, response that passes, response that fails)
CASES = [
    ({"type": "lowercase"}, "all quiet here, 42 times.", "All quiet here."),
    ({"type": "uppercase"}, "LOUD AND CLEAR, 42!", "LOUD and CLEAR"),
    ({"type": "word_count", "min": 3, "max": 5}, "one two three four", "one two"),
    ({"type": "word_count", "max": 3}, "don't stop now", "one two three four"),
    ({"type": "word_count", "min": 2}, "well-known fact", "single"),
    ({"type": "sentence_count", "min": 2, "max": 2}, "It rains. We stay in!", "It rains. We stay in. Fine?"),
    ({"type": "sentence_count", "max": 1}, "Just one sentence here.", "One. Two."),
    ({"type": "keywords", "keywords": ["Budget", "due date"]}, "The budget is set; the DUE DATE is Friday.",
     "The budgetary due date."),
    ({"type": "forbidden_words", "words": ["very", "really"]}, "Everything is every bit fine.",
     "It is Really fine."),
    ({"type": "ends_with", "phrase": "Any other questions?"}, "Done.\nAny other questions?  \n",
     "Any other questions? Thanks."),
    ({"type": "starts_with", "phrase": "Dear team,"}, "  Dear team, hello.", "Hello. Dear team,"),
    ({"type": "bullet_count", "n": 3}, "Intro:\n* one\n- two\n  * three\n***\nend", "* one\n* two\n*not a bullet"),
    ({"type": "json_format"}, '```json\n{"a": [1, 2]}\n```', 'Here it is: {"a": 1}'),
    ({"type": "json_format"}, ' {"name": "x"} ', '{"name": "x",}'),
    ({"type": "no_commas"}, "No commas at all.", "Well, one comma."),
    ({"type": "title"}, "<<A Day Out>>\nWe went.", "<< >> is blank and <not double>"),
    ({"type": "paragraphs", "n": 2}, "First one.\n\nSecond one.", "Only one paragraph here."),
    ({"type": "paragraphs", "n": 3}, "A.\n***\nB.\n\n  \nC.", "A.\n\nB."),
    ({"type": "placeholders", "min": 2}, "Meet at [place] on [date].", "Meet at [place] on Monday []."),
    ({"type": "postscript"}, "Bye.\n\nP.S. bring snacks", "Bye. I said p.s. in the middle."),
    ({"type": "postscript", "marker": "P.P.S"}, "Bye.\np.p.s. again", "Bye.\nP.S. once"),
]


def test_every_checker_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKERS)


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_checker_pass_and_fail(constraint, good, bad):
    [ok] = check(good, [constraint])
    [not_ok] = check(bad, [constraint])
    assert ok["ok"] is True, ok["detail"]
    assert not_ok["ok"] is False, not_ok["detail"]
    assert ok["type"] == not_ok["type"] == constraint["type"]
    assert isinstance(ok["detail"], str) and not_ok["detail"]


def test_counts_and_details():
    assert words("Don't  stop -- the well-known 3 cats_dogs") == ["Don't", "stop", "the", "well-known", "3", "cats", "dogs"]
    assert len(sentences("Dr. Who? Yes! e.g. fine...")) == 5  # abbreviations count as sentence ends, by design
    assert check("a b c d", [{"type": "word_count", "max": 2}])[0]["detail"] == "4 words, more than the maximum 2"
    assert check("x", [{"type": "keywords", "keywords": ["cat", "dog"]}])[0]["detail"] == "missing: cat, dog"
    assert not check("", [{"type": "lowercase"}])[0]["ok"]  # no letters is not "all lowercase"


def test_check_keeps_order_and_scores_each():
    res = check("hello, world", [{"type": "lowercase"}, {"type": "no_commas"}, {"type": "word_count", "min": 2}])
    assert [(r["type"], r["ok"]) for r in res] == [("lowercase", True), ("no_commas", False), ("word_count", True)]


@pytest.mark.parametrize(("constraints", "match"), [
    ([{"type": "shout"}], "unknown constraint type 'shout'"),
    ([{"kind": "lowercase"}], "unknown constraint type None"),
    (["lowercase"], "must be an object"),
    ([], "non-empty list"),
    ({"type": "lowercase"}, "non-empty list"),
    ([{"type": "lowercase", "strict": True}], r"unknown argument\(s\) \['strict'\]"),
    ([{"type": "word_count"}], "needs min, max or both"),
    ([{"type": "word_count", "min": 10, "max": 5}], "min 10 is greater than max 5"),
    ([{"type": "word_count", "max": "50"}], "max must be an integer"),
    ([{"type": "word_count", "max": True}], "max must be an integer"),
    ([{"type": "word_count", "min": -1}], "min must be >= 0"),
    ([{"type": "bullet_count"}], r"missing argument\(s\) \['n'\]"),
    ([{"type": "bullet_count", "n": 0}], "n must be >= 1"),
    ([{"type": "paragraphs", "n": 2.0}], "n must be an integer"),
    ([{"type": "keywords", "keywords": []}], "non-empty list of non-blank strings"),
    ([{"type": "keywords", "keywords": "cat"}], "non-empty list of non-blank strings"),
    ([{"type": "forbidden_words", "words": ["ok", " "]}], "non-empty list of non-blank strings"),
    ([{"type": "ends_with", "phrase": "  "}], "phrase must be a non-blank string"),
    ([{"type": "placeholders"}], r"missing argument\(s\) \['min'\]"),
    ([{"type": "lowercase"}, {"type": "postscript", "marker": 3}], "constraint 1: postscript: marker must be"),
])
def test_bad_constraints_raise_with_location(constraints, match):
    with pytest.raises(DataError, match=match) as e:
        validate_constraints(constraints, "prompts.jsonl", 7)
    assert str(e.value).startswith("prompts.jsonl:7: constraints: ")


def test_check_rejects_unknown_type():
    with pytest.raises(DataError, match="unknown constraint type"):
        check("hi", [{"type": "nope"}])


def _write(tmp_path, lines):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


GOOD = json.dumps({"id": "a", "prompt": "Say hi in lowercase.", "constraints": [{"type": "lowercase"}]})


def test_read_prompts_ok(tmp_path):
    rows = read_prompts(_write(tmp_path, [GOOD, "", json.dumps({"id": "b", "prompt": "x", "constraints": [{"type": "no_commas"}]})]))
    assert [(r["id"], r["line"]) for r in rows] == [("a", 1), ("b", 3)]


@pytest.mark.parametrize(("bad", "match"), [
    ('{"id": "b", "prompt": "x", "constraints": [', r"prompts.jsonl:2: valid JSON"),
    (json.dumps({"id": "b", "prompt": "x", "constraints": [{"type": "rhyme"}]}), r"prompts.jsonl:2: constraints: .*unknown constraint type 'rhyme'"),
    (json.dumps({"id": "a", "prompt": "x", "constraints": [{"type": "lowercase"}]}), r"prompts.jsonl:2: unique id: 'a' already used on line 1"),
    (json.dumps({"id": "", "prompt": "x", "constraints": [{"type": "lowercase"}]}), r"prompts.jsonl:2: id"),
    (json.dumps({"id": "b", "prompt": " ", "constraints": [{"type": "lowercase"}]}), r"prompts.jsonl:2: prompt"),
    (json.dumps({"id": "b", "prompt": "x"}), r"prompts.jsonl:2: constraints: must be a non-empty list"),
    (json.dumps({"id": "b", "prompt": "x", "constraints": [{"type": "lowercase"}], "lang": "en"}), r"prompts.jsonl:2: prompt row keys"),
    ('["a list"]', r"prompts.jsonl:2: JSON object per line"),
])
def test_read_prompts_bad_line(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        read_prompts(_write(tmp_path, [GOOD, bad]))


def test_read_prompts_empty_file(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        read_prompts(_write(tmp_path, [""]))
