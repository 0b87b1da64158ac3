"""The project's own constraint prompt files: valid, sized as documented, and eval disjoint from train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.constraints.checkers import CHECKERS, read_prompts, words

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


def test_sizes_and_constraint_counts(sets):
    train, ev = sets
    assert 96 <= len(train) <= 128 and 36 <= len(ev) <= 48
    for row in train + ev:
        assert 1 <= len(row["constraints"]) <= 3, row["id"]


def test_every_checker_is_exercised_in_training(sets):
    train, _ = sets
    used = Counter(c["type"] for r in train for c in r["constraints"])
    assert set(used) == set(CHECKERS)


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
