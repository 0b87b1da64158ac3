"""The project's prompt files in IFEval terms (pipeline.constraints.prompts) and the shim evaluate uses.

The 25 checkers themselves: tests/test_ifeval.py.
"""

from __future__ import annotations

import json

import pytest

from pipeline.constraints import checkers, prompts
from pipeline.core.errors import DataError

LOWER = "change_case:english_lowercase"
GOOD = json.dumps({"id": "a", "prompt": "Say hi in lowercase.", "instruction_id_list": [LOWER], "kwargs": [{}]})


def _write(tmp_path, lines):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_read_prompts_ok(tmp_path):
    other = json.dumps({"id": "b", "prompt": "x", "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
                        "kwargs": [{}, {"relation": "less than", "num_words": 9}]})
    rows = prompts.read_prompts(_write(tmp_path, [GOOD, "", other]))
    assert [(r["id"], r["line"]) for r in rows] == [("a", 1), ("b", 3)]
    assert rows[1]["kwargs"][1] == {"relation": "less than", "num_words": 9}


def _row(**kw):
    return json.dumps({"id": "b", "prompt": "x", "instruction_id_list": [LOWER], "kwargs": [{}], **kw})


@pytest.mark.parametrize(("bad", "match"), [
    ('{"id": "b", "prompt": "x", "instruction_id_list": [', r"prompts.jsonl:2: valid JSON"),
    (_row(instruction_id_list=["rhyme"]), r"prompts.jsonl:2: instructions: instruction 0: unknown instruction id 'rhyme'"),
    (_row(instruction_id_list=[]), r"prompts.jsonl:2: instructions: instruction_id_list must be a non-empty list"),
    (_row(kwargs=[{}, {}]), r"prompts.jsonl:2: instructions: kwargs must be a list of 1 objects"),
    (_row(instruction_id_list=["length_constraints:number_words"], kwargs=[{"num_words": 5}]),
     r"prompts.jsonl:2: instructions: instruction 0: .*missing kwarg\(s\) \['relation'\]"),
    (_row(kwargs=[{"strict": True}]), r"prompts.jsonl:2: instructions: instruction 0: .*unknown kwarg\(s\) \['strict'\]"),
    (_row(id="a"), r"prompts.jsonl:2: unique id: 'a' already used on line 1"),
    (_row(id=""), r"prompts.jsonl:2: id"),
    (_row(prompt=" "), r"prompts.jsonl:2: prompt"),
    (_row(constraints=[{"type": "lowercase"}]), r"prompts.jsonl:2: prompt row keys: unknown key\(s\) \['constraints'\]"),
    ('["a list"]', r"prompts.jsonl:2: JSON object per line"),
])
def test_read_prompts_bad_line(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        prompts.read_prompts(_write(tmp_path, [GOOD, bad]))


def test_read_prompts_empty_file(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        prompts.read_prompts(_write(tmp_path, [""]))


def test_held_out_ids_and_check_row():
    train = [{"instruction_id_list": [LOWER, "punctuation:no_comma"]}]
    ev = [{"instruction_id_list": [LOWER]}, {"instruction_id_list": ["startend:quotation", "detectable_format:title"]}]
    assert prompts.held_out_ids(train, ev) == ("detectable_format:title", "startend:quotation")
    row = {"prompt": "p", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    assert prompts.check_row(row, '"yes"') == [True] and prompts.check_row(row, '"yes"\nok') == [False]
    assert prompts.check_row(row, '"yes"\nok', loose=True) == [True]


def test_shim_for_evaluate(tmp_path):
    rows = checkers.read_prompts(_write(tmp_path, [GOOD]))
    assert rows[0]["constraints"] == [{"type": LOWER}]
    res = checkers.check("the weather is lovely today and we are going for a walk", rows[0]["constraints"])
    assert res == [{"type": LOWER, "ok": True, "detail": "followed"}]
    assert checkers.check("", [{"type": "punctuation:no_comma"}])[0]["ok"] is False  # IFEval: blank fails
