"""IFEval checkers, strict and loose, I/O and `openrelease ifeval`, against the reference's rules.

Every expected verdict below was also run through lm-evaluation-harness's copy of the reference
(`lm_eval/tasks/ifeval`, 0.4.13) with NLTK 3.10 and the same punkt_tab English parameters, and agrees,
except `letter: "#"`: the current google-research reference counts "#", as here; that copy draws a
random letter for anything outside a-z.
"""

from __future__ import annotations

import json

import pytest

from pipeline.constraints import ifeval
from pipeline.core.errors import DataError
from tests.conftest import shared_data

LT, AL = "less than", "at least"
# (instruction id, kwargs, response that follows, response that does not) - strict verdicts
CASES = [
    ("keywords:existence", {"keywords": ["Budget", "due"]}, "The BUDGET is overdue.", "The budget is set."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": AL}, "Cat and category.", "One cat."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": LT}, "One cat.", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["red", "blue"]}, "Reddish and bluer skies.", "A Red car."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": AL}, "Zebra zoo pizza", "Zebra zoo"),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": AL}, "#one #two", "#one"),
    ("language:response_language", {"language": "fr"},
     "Bonjour, je voudrais un café au lait et un croissant, s'il vous plaît.",
     "Hello, I would like a coffee with milk and a croissant, please."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "Dr. Smith came. He left.",
     "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "It rains. We stay in!", "It rains."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n\nSecond."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA\n***\nB\n***", "A\n***\n***\nB"),
    ("length_constraints:number_words", {"num_words": 4, "relation": LT}, "don't stop", "one two three four"),
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "well-known fact", "single"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Start here.\n\n\"Then, we go.", "Start here.\n\nNext we go."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "At [place] on [date].", "At [place] on Monday."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. bring snacks", "Bye. PS bring snacks"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\np. p. s. again", "Bye.\nP.S. once"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n- two\n  * three\n**bold**",
     "* one\n* two"),
    ("detectable_format:constrained_response", {}, "Well... My answer is maybe.", "my answer is yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", "Section 1\nA\nSECTION 2\nB"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here: {"a": 1}'),
    ("detectable_format:title", {}, "<<A Day Out>>\nWe went.", "<< >> and <not double>"),
    ("combination:two_responses", {}, "Tea.\n******\nCoffee.", "Tea.\n******\nTea."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"  ',
     "Any other questions? Thanks."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL},
     "The NASA and ESA teams met.", "The NASA team met."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT},
     "The NASA team met.", "The NASA and ESA teams met."),
    ("change_case:english_capital", {}, "THE WEATHER IS LOVELY TODAY AND WE ARE GOING FOR A WALK.",
     "The weather is lovely today and we are going for a walk."),
    ("change_case:english_lowercase", {}, "the weather is lovely today and we are going for a walk.",
     "the weather is lovely today and We are going for a walk."),
    ("punctuation:no_comma", {}, "No commas here.", "Well, one."),
    ("startend:quotation", {}, ' "Quoted answer." ', '"Only an opening quote.'),
]


def test_all_25_ids_and_every_id_has_cases():
    assert len(ifeval.INSTRUCTION_IDS) == 25 == len(set(ifeval.INSTRUCTION_IDS))
    assert {c[0] for c in CASES} == set(ifeval.INSTRUCTION_IDS)


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_strict_pass_and_fail(iid, kwargs, good, bad):
    assert ifeval.validate_kwargs(iid, kwargs) is None
    assert ifeval.follows(iid, kwargs, "prompt", good) is True
    assert ifeval.follows(iid, kwargs, "prompt", bad) is False


@pytest.mark.parametrize("iid", ifeval.INSTRUCTION_IDS)
def test_blank_response_fails_every_instruction_strict_and_loose(iid):
    """IFEval's loop: `response.strip() and check(response)`. Even no_comma and `less than` fail on ""."""
    kwargs = next(k for i, k, _, _ in CASES if i == iid)
    for blank in ("", "  \n\t"):
        assert not ifeval.follows(iid, kwargs, "p", blank)
        assert not ifeval.follows(iid, kwargs, "p", blank, loose=True)


def test_quirks_kept_as_published():
    # keyword existence is a case-insensitive regex search, not a whole-word match
    assert ifeval.follows("keywords:existence", {"keywords": ["cat"]}, "", "concatenate")
    # "P.S." is found anywhere in a line, not only at its start
    assert ifeval.follows("detectable_content:postscript", {"postscript_marker": "P.S."}, "", "I said p.s. here")
    # undecidable language counts as followed (only digits: langdetect has no features)
    assert ifeval.follows("language:response_language", {"language": "ja"}, "", "12345")
    # paragraphs are *** dividers only; blank lines do not split
    assert ifeval.follows("length_constraints:number_paragraphs", {"num_paragraphs": 1}, "", "A\n\nB")


def test_loose_variants():
    v = ifeval.response_variants("Sure!\n**Answer** here\nBye")
    assert v == ["Sure!\n**Answer** here\nBye", "Sure!\nAnswer here\nBye", "**Answer** here\nBye", "Sure!\n**Answer** here",
                 "**Answer** here", "Answer here\nBye", "Sure!\nAnswer here", "Answer here"]
    lower = "Sure:\nthe weather is lovely today and we are going for a walk."
    assert not ifeval.follows("change_case:english_lowercase", {}, "", lower)
    assert ifeval.follows("change_case:english_lowercase", {}, "", lower, loose=True)  # first line removed
    quoted = '"**The weather is lovely today.**"\n\nHope this helps'
    assert not ifeval.follows("startend:quotation", {}, "", quoted)
    assert ifeval.follows("startend:quotation", {}, "", quoted, loose=True)  # last line removed
    stars = "**Hello**, my answer is yes.".replace(", my answer", ". My answer")
    assert ifeval.follows("detectable_format:constrained_response", {}, "", stars)
    # no variant helps a real miss
    assert not ifeval.follows("punctuation:no_comma", {}, "", "a,\nb,\nc,", loose=True)


def test_follow_list_and_bad_kwargs():
    ids = ["punctuation:no_comma", "length_constraints:number_words"]
    assert ifeval.follow_list(ids, [{}, {"relation": LT, "num_words": 3}], "p", "a b c") == [True, False]
    with pytest.raises(DataError, match="2 instruction ids but 1 kwargs"):
        ifeval.follow_list(ids, [{}], "p", "x")
    with pytest.raises(DataError, match="missing kwarg"):
        ifeval.follows("length_constraints:number_words", {"num_words": 3}, "p", "x")


@pytest.mark.parametrize(("iid", "kwargs", "match"), [
    ("punctuation:comma", {}, "unknown instruction id"),
    ("punctuation:no_comma", {"x": 1}, r"unknown kwarg\(s\) \['x'\]"),
    ("length_constraints:number_words", {"num_words": 3}, r"missing kwarg\(s\) \['relation'\]"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "relation must be one of"),
    ("length_constraints:number_words", {"num_words": -1, "relation": LT}, "num_words must be an integer >= 0"),
    ("length_constraints:number_words", {"num_words": True, "relation": LT}, "num_words must be an integer"),
    ("language:response_language", {"language": "xx"}, "ISO 639-1"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": AL}, "single character"),
    ("keywords:existence", {"keywords": []}, "non-empty list"),
    ("keywords:existence", {"keywords": ["ok", "("]}, r"keywords\[1\] is used as a regular expression"),
    ("startend:end_checker", {"end_phrase": " "}, "non-blank string"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"},
     "nth_paragraph 3 is greater than num_paragraphs 2"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 0, "first_word": "a"},
     "nth_paragraph must be an integer >= 1"),
])
def test_validate_kwargs_problems(iid, kwargs, match):
    problem = ifeval.validate_kwargs(iid, kwargs)
    assert problem is not None and __import__("re").search(match, problem), problem


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROW = {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def test_read_ifeval_drops_none_kwargs(tmp_path):
    hf = {**ROW, "key": 2, "prompt": "Two", "kwargs": [{"num_words": None, "relation": None}]}
    rows = ifeval.read_ifeval(_jsonl(tmp_path / "in.jsonl", [ROW, "", hf]))
    assert [(r["key"], r["line"], r["kwargs"]) for r in rows] == [(1, 1, [{}]), (2, 3, [{}])]


@pytest.mark.parametrize(("bad", "match"), [
    ("{oops", r"in.jsonl:2: valid JSON"),
    ({**ROW, "key": "2"}, r"in.jsonl:2: key: must be an integer"),
    ({**ROW, "key": 1}, r"in.jsonl:2: unique key: 1 already used on line 1"),
    ({**ROW, "key": 2, "prompt": ""}, r"in.jsonl:2: prompt"),
    ({**ROW, "key": 2, "instruction_id_list": []}, r"in.jsonl:2: instruction_id_list"),
    ({**ROW, "key": 2, "kwargs": []}, r"in.jsonl:2: kwargs: must be a list of 1"),
    ({**ROW, "key": 2, "instruction_id_list": ["nope"]}, r"in.jsonl:2: kwargs: instruction 0: unknown instruction id 'nope'"),
    ({**ROW, "key": 2, "extra": 1}, r"in.jsonl:2: IFEval input keys"),
])
def test_read_ifeval_bad_line(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        ifeval.read_ifeval(_jsonl(tmp_path / "in.jsonl", [ROW, bad]))


@pytest.mark.parametrize(("bad", "match"), [
    ({"prompt": "a"}, r"resp.jsonl:2: response: must be a string"),
    ({"response": "a"}, r"resp.jsonl:2: prompt: must be a string"),
    ({"prompt": "Say hi without commas.", "response": "other"}, r"resp.jsonl:2: one response per prompt: .*line 1"),
])
def test_read_responses_bad_line(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        ifeval.read_responses(_jsonl(tmp_path / "resp.jsonl", [{"prompt": ROW["prompt"], "response": "hi"}, bad]))


def test_evaluate_missing_response_names_the_input_line(tmp_path):
    rows = ifeval.read_ifeval(_jsonl(tmp_path / "in.jsonl", [ROW]))
    with pytest.raises(DataError, match=r"in.jsonl:1: a response for every prompt"):
        ifeval.evaluate(rows, {}, where=tmp_path / "in.jsonl")


def test_accuracy_and_report():
    outs = [{"instruction_id_list": ["a:x", "a:y"], "follow_instruction_list": [True, False], "follow_all_instructions": False},
            {"instruction_id_list": ["b:z"], "follow_instruction_list": [True], "follow_all_instructions": True}]
    acc = ifeval.accuracy(outs)
    assert (acc["prompt_level"], acc["instruction_level"]) == (0.5, 2 / 3)
    assert acc["by_category"] == {"a": 0.5, "b": 1.0} and acc["by_instruction"] == {"a:x": 1.0, "a:y": 0.0, "b:z": 1.0}
    assert ifeval.report(outs).splitlines()[:4] == ["prompt-level: 0.5", f"instruction-level: {2 / 3}", "", "a 0.5"]


@pytest.fixture(scope="module")
def ifeval_input():
    return shared_data("ifeval/input_data.jsonl")


def test_all_541_reference_prompts_validate(ifeval_input):
    rows = ifeval.read_ifeval(ifeval_input)
    assert len(rows) == 541
    assert {i for r in rows for i in r["instruction_id_list"]} == set(ifeval.INSTRUCTION_IDS)


def test_cli_end_to_end(ifeval_input, tmp_path, capsys):
    from pipeline.cli import main

    by_key = {json.loads(line)["key"]: line for line in ifeval_input.read_text(encoding="utf-8").splitlines()}
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(by_key[k] for k in (1001, 1005, 1012)) + "\n", encoding="utf-8")
    prompts = {k: json.loads(by_key[k])["prompt"] for k in (1001, 1005, 1012)}
    resp = _jsonl(tmp_path / "resp.jsonl", [
        {"prompt": prompts[1001], "response": "Hark! Day one in Tokyo\nthen Kyoto and Nara."},  # no comma: follows
        {"prompt": prompts[1005], "response": "[Name]\n[Address]\n[Phone]"},  # 3 of 12 placeholders: fails
        # repeat_prompt + title: a leading line breaks the repeat in strict mode; loose drops it
        {"prompt": prompts[1012], "response": "Sure.\n" + prompts[1012] + "\n<<Resignation>>\nDear boss, I quit."},
    ])
    assert main(["ifeval", "--input", str(inp), "--responses", str(resp), "--out", str(tmp_path / "out")]) == 0
    strict = [json.loads(x) for x in (tmp_path / "out/eval_results_strict.jsonl").read_text().splitlines()]
    loose = [json.loads(x) for x in (tmp_path / "out/eval_results_loose.jsonl").read_text().splitlines()]
    assert list(strict[0]) == ["follow_all_instructions", "follow_instruction_list", "instruction_id_list", "prompt", "response"]
    assert [s["follow_instruction_list"] for s in strict] == [[True], [False], [False, True]]
    assert [s["follow_instruction_list"] for s in loose] == [[True], [False], [True, True]]
    out = capsys.readouterr().out
    assert "eval_results_strict.jsonl Accuracy Scores:\nprompt-level: 0.3333333333333333\ninstruction-level: 0.5\n" in out
    assert "eval_results_loose.jsonl Accuracy Scores:\nprompt-level: 0.6666666666666666\ninstruction-level: 0.75\n" in out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    inp = _jsonl(tmp_path / "in.jsonl", [ROW, {**ROW, "key": 2, "kwargs": [{"x": 1}]}])
    resp = _jsonl(tmp_path / "resp.jsonl", [{"prompt": ROW["prompt"], "response": "hi"}])
    assert main(["ifeval", "--input", str(inp), "--responses", str(resp), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("openrelease ifeval: error: ") and f"{inp}:2: kwargs:" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
