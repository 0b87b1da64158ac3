"""The project's own constraint prompt files: valid IFEval ids, sized as documented, eval disjoint from train,
some instruction ids held out of training, and an empty answer passes no prompt."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.constraints.ifeval import INSTRUCTION_IDS
from pipeline.constraints.prompts import check_row, held_out_ids, read_prompts


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)

ROOT = Path(__file__).resolve().parents[1]
NGRAM = 13  # the overlap length `build` decontaminates with by default


def _paths() -> tuple[Path, Path]:
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    return ROOT / paths["train_prompts"], ROOT / paths["eval_prompts"]


@pytest.fixture(scope="module")
def sets():
    train, ev = _paths()
    return read_prompts(train), read_prompts(ev)


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = [x.lower() for x in words(text)]
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _norm(text: str) -> str:
    return " ".join(x.lower() for x in words(text))


def test_sizes_and_instruction_counts(sets):
    train, ev = sets
    assert 96 <= len(train) <= 128 and 36 <= len(ev) <= 56
    for row in train + ev:
        assert 1 <= len(row["instruction_id_list"]) <= 3, row["id"]
        assert set(row["instruction_id_list"]) <= set(INSTRUCTION_IDS)


def test_some_instruction_ids_are_never_seen_in_training(sets):
    """Generalisation (issue 11): evaluation reports these held-out ids apart from the trained ones."""
    train, ev = sets
    held = held_out_ids(train, ev)
    assert len(held) >= 5, held
    trained = {i for r in train for i in r["instruction_id_list"]}
    assert not set(held) & trained
    assert len(trained) >= 12  # training still covers most kinds of instruction
    # each held-out id is scored on at least one eval prompt
    assert Counter(i for r in ev for i in r["instruction_id_list"] if i in held).keys() == set(held)


@pytest.mark.parametrize("blank", ["", "   \n"])
def test_empty_response_fails_every_prompt(sets, blank):
    """IFEval's own rule (a blank response follows nothing) makes every prompt fail on an empty answer."""
    for row in sets[0] + sets[1]:
        assert not any(check_row(row, blank)) and not any(check_row(row, blank, loose=True)), row["id"]


def test_eval_disjoint_from_train(sets):
    train, ev = sets
    assert not {_norm(r["prompt"]) for r in train} & {_norm(r["prompt"]) for r in ev}
    assert not {r["id"] for r in train} & {r["id"] for r in ev}
    train_grams = set().union(*(_ngrams(r["prompt"]) for r in train))
    leaks = [r["id"] for r in ev if _ngrams(r["prompt"]) & train_grams]
    assert not leaks, f"eval prompts sharing a {NGRAM}-gram with train: {leaks}"


def test_overlap_check_would_catch_a_leak(sets):
    """The check above is not vacuous: a train prompt with an eval sentence inside is caught."""
    train, ev = sets
    planted = "Please also do this. " + ev[0]["prompt"]
    assert _ngrams(planted) & set().union(*(_ngrams(r["prompt"]) for r in ev))


def test_no_duplicates_within_a_set(sets):
    for rows in sets:
        texts = [_norm(r["prompt"]) for r in rows]
        assert len(set(texts)) == len(texts)
