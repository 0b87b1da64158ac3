"""The project's own prompt files in their three roles (train makes data, dev selects, test is reported):
valid IFEval ids, sized as documented, pairwise disjoint (exact, 13-gram, and build's own check), some
instruction ids held out of training, and an empty answer passes no prompt."""

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


def _paths() -> dict[str, Path]:
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    return {role: ROOT / paths[f"{role}_prompts"] for role in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def roles() -> dict[str, list[dict]]:
    return {role: read_prompts(path) for role, path in _paths().items()}


@pytest.fixture(scope="module")
def sets(roles):
    """(train, evaluation) with dev and test together as the evaluation prompts."""
    return roles["train"], roles["dev"] + roles["test"]


def _ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = [x.lower() for x in words(text)]
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _norm(text: str) -> str:
    return " ".join(x.lower() for x in words(text))


def test_sizes_and_instruction_counts(roles, sets):
    """test >= 100 so the headline delta's interval is about +-0.08 (issue 21), dev >= 50."""
    train, ev = sets
    assert 96 <= len(train) <= 128 and len(roles["test"]) >= 100 and len(roles["dev"]) >= 50
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


@pytest.mark.parametrize("a, b", [("train", "dev"), ("train", "test"), ("dev", "test")])
def test_roles_are_disjoint(roles, a, b):
    assert not {_norm(r["prompt"]) for r in roles[a]} & {_norm(r["prompt"]) for r in roles[b]}
    assert not {r["id"] for r in roles[a]} & {r["id"] for r in roles[b]}
    grams = set().union(*(_ngrams(r["prompt"]) for r in roles[a]))
    leaks = [r["id"] for r in roles[b] if _ngrams(r["prompt"]) & grams]
    assert not leaks, f"{b} prompts sharing a {NGRAM}-gram with {a}: {leaks}"


def test_build_checks_the_roles(tmp_path):
    """build refuses to run when a dev or test prompt is also a train prompt (one line, file:line)."""
    from pipeline.core.errors import DataError
    from pipeline.core.params import load_params
    from pipeline.stages.build import check_roles

    P = load_params(ROOT / "params.yaml")
    roles = {k: str(ROOT / v) for k, v in P.paths.prompt_roles().items()}
    check_roles(roles, P.build, ROOT)  # the shipped files pass
    leaky = tmp_path / "test.jsonl"
    lines = (ROOT / P.paths.test_prompts).read_text().splitlines()
    leaky.write_text("\n".join([*lines, (ROOT / P.paths.train_prompts).read_text().splitlines()[5]]) + "\n")
    with pytest.raises(DataError, match=rf"test.jsonl:{len(lines) + 1}.*overlaps train"):
        check_roles({**roles, "test": str(leaky)}, P.build, ROOT)


def test_overlap_check_would_catch_a_leak(sets):
    """The check above is not vacuous: a train prompt with an eval sentence inside is caught."""
    train, ev = sets
    planted = "Please also do this. " + ev[0]["prompt"]
    assert _ngrams(planted) & set().union(*(_ngrams(r["prompt"]) for r in ev))


def test_no_duplicates_within_a_set(sets):
    for rows in sets:
        texts = [_norm(r["prompt"]) for r in rows]
        assert len(set(texts)) == len(texts)
