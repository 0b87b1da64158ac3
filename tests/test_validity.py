"""Degenerate answers: each rule on what it must catch and on what it must let through, the panel,
`rate` never choosing a degenerate sample, and `openrelease score` agreeing with evaluate."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from pipeline.constraints.validity import Rules, assess, ends_finished, rule_rates, whole_repeats, words
from pipeline.eval.panel import MEMBERS, cut_mid_sentence, run_panel
from pipeline.eval.verifiable import read_prompt_set, score_set

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RULES = Rules()

CHEERS = "Dear plumber, could you send me a quote for the tap? Thanks.\n\n" + "Cheers.\n\n" * 9
DOG = "The dog was a brave one. The dog swam in the lake. " * 4


def failed(prompt: str, text: str, finished=True, **kw) -> list[str]:
    return assess([prompt], [text], [finished], RULES, **kw)[0].failed


@pytest.mark.parametrize("text, rule", [
    (CHEERS, "repeated_sentence"),
    (DOG, "repetition"),
    ("It is cold. It is cold.", "repetition"),   # a short answer said twice: too few 4-grams for the rate
    ("ok", "too_short"),
    ("", "empty"),
    ("   \n", "empty"),
])
def test_each_rule_catches_its_failure(text, rule):
    assert rule in failed("Write a short note to a plumber.", text)


@pytest.mark.parametrize("prompt", ["Explain why ice floats on water. Use fewer than 45 words."])
@pytest.mark.parametrize("transform", [str, str.lower, str.upper, lambda p: p + " Sure."])
def test_an_echo_in_any_case_copies_the_prompt(prompt, transform):
    assert "prompt_copy" in failed(prompt, transform(prompt))


def test_repeating_the_request_as_asked_is_not_a_copy():
    ask = "Write a short haiku about the rain falling on the old tin roof of the barn."
    prompt = f"First repeat the request word for word without change, then give your answer. {ask}"
    answer = f"{ask}\nRain taps the tin roof, slow."
    assert "prompt_copy" in failed(prompt, answer)
    assert failed(prompt, answer, required=[[ask]]) == []


def test_reuse_counts_prompts_not_samples():
    prompts = ["Name a fruit.", "Name a colour.", "Name a planet."]
    fixed = ["i cannot help with that."] * 3
    assert all("reused" in v.failed for v in assess(prompts, fixed, None, RULES))
    near = ["I cannot help with that.", "i cannot help with that!", "I can not help with that."]
    assert all("reused" in v.failed for v in assess(prompts, near, None, RULES))
    # six identical samples of one prompt are one prompt's answers, not a canned answer
    same_prompt = assess(["Name a fruit."] * 6, ["An apple is a fruit."] * 6, None, RULES, groups=["p1"] * 6)
    assert not any("reused" in v.failed for v in same_prompt)
    assert "reused" not in assess(prompts[:2], fixed[:2], None, RULES)[0].failed  # two prompts: below min_reuse_prompts


def test_cut_answers_by_flag_and_by_text():
    prompt = "Describe a calm lake in a few sentences."
    assert "unfinished" in failed(prompt, "The lake lies still under the morning sky.", finished=False)
    assert "unfinished" in failed(prompt, "The lake lies still under the morning sky and the", finished=None)
    assert "unfinished" in failed(prompt, "The lake lies still, with reeds,", finished=None)
    for done in ("The lake lies still under the morning sky.", "Best wishes,\nSam", "- a calm lake",
                 '{"lake": "calm"}', "It holds 63%", "The lake is calm 🙂"):
        assert "unfinished" not in failed(prompt, done, finished=None), done
    # the generator's own word wins over the text
    assert "unfinished" not in failed(prompt, "The lake lies still under the morning sky and the", finished=True)


def test_clean_answers_break_no_rule():
    prompts = ["Explain why ice floats on water. Use fewer than 45 words.",
               "Give three tips for keeping a houseplant alive, as exactly 3 bullet points.",
               "Write a note thanking a nurse. Give it a title wrapped in double angle brackets."]
    answers = ["Ice is less dense than liquid water because its molecules lock into an open lattice, so it floats.",
               "* Water it when the soil is dry.\n* Give it bright, indirect light.\n* Repot it when roots crowd the pot.",
               "<<Thank You>>\nThank you for your patience and kindness during my stay. You made a hard week easier."]
    assert [v.failed for v in assess(prompts, answers, None, RULES)] == [[], [], []]


def test_measures():
    assert words("Hello, World! It's") == ["hello", "world", "it", "s"]
    assert whole_repeats(words("a b a b a b")) == 3 and whole_repeats(words("a b c")) == 1
    assert ends_finished("Done.") and not ends_finished("and then we walked down to the") and not ends_finished("")
    assert ends_finished("Kind regards")  # a short last line: a sign-off, heading or list item
    rates = rule_rates(assess(["q1", "q2"], ["", "A fine answer here."], None, RULES))
    assert rates["empty"] == 0.5 and rates["degenerate"] == 0.5


# ---------------------------------------------------------------- human-written answers

def _hh_chosen(limit=None):
    from pipeline.data.formats.hh_rlhf import parse_transcript

    prompts, answers = [], []
    with gzip.open(SHARED / "hh-rlhf" / "harmless-base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            msgs = parse_transcript(json.loads(line)["chosen"])
            if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
                prompts.append(msgs[-2]["content"])
                answers.append(msgs[-1]["content"])
    return prompts[:limit], answers[:limit]


@pytest.mark.skipif(not (SHARED / "hh-rlhf").is_dir(), reason="../shared/data/hh-rlhf is absent (README: test data)")
def test_rules_rarely_flag_human_answers():
    """The rules' false-positive rates on people's answers stay where params.yaml's comments say.
    hh-rlhf's turns are often cut mid-sentence in the dataset itself, and its last turns are often
    chit-chat ("What do you mean?"), so `unfinished` and `off_topic` are checked on llama-factory only."""
    prompts, answers = _hh_chosen()
    rates = rule_rates(assess(prompts, answers, None, RULES))
    for rule in ("too_short", "repetition", "repeated_sentence", "prompt_copy", "reused"):
        assert rates[rule] <= 0.02, (rule, rates[rule])
    lf = json.loads((SHARED / "llama-factory" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    rates = rule_rates(assess([r["conversations"][-1]["value"] for r in lf], [r["chosen"]["value"] for r in lf],
                              None, RULES))
    assert rates["degenerate"] <= 0.12 and rates["off_topic"] <= 0.04, rates


# ---------------------------------------------------------------- the panel

GOOD = {  # hand-written answers to the first test prompts, each meeting its instructions
    "test-001": "hi there,\n\ncould you send me a quote for fixing the leaking tap in my kitchen? it drips all day.\n\nthanks,\nsam",
    "test-002": "Ice is less dense than liquid water because its molecules form an open lattice when they freeze.",
    "test-003": "* Water it when the top of the soil is dry.\n* Give it bright, indirect light.\n* Wipe dust off the leaves.",
    "test-004": "The waves hush against the sand and fall back into the dark again and again.",
    "test-006": "A small dog feared the lake until a brave duck paddled beside him. He kicked, floated and laughed.",
}


def test_panel_members_are_caught_and_score_below_real_answers():
    rows = [r for r in read_prompt_set(ROOT / "data" / "prompts" / "test.jsonl") if r["id"] in GOOD]
    base = [GOOD[r["id"]] for r in rows]
    good = score_set(rows, base, None, RULES)
    assert good.passed.all(), [v.failed for v in good.verdicts]
    metrics, table = run_panel(rows, base, RULES)
    assert set(table["member"]) == set(MEMBERS) and len(table) == len(MEMBERS) * len(rows)
    assert metrics["pass_rate_floor"] == max(metrics[f"panel_{n}_pass_rate"] for n in MEMBERS)
    assert metrics["pass_rate_floor"] < good.passed.mean()
    expect = {"empty": "empty", "one_word": "too_short", "echo": "prompt_copy", "echo_lower": "prompt_copy",
              "echo_upper": "prompt_copy", "fixed": "reused", "base_repeated": "repetition", "base_cut": "unfinished"}
    for member, rule in expect.items():
        flags = list(table[table["member"] == member]["failed"])
        if member == "base_cut":  # a cut that leaves a short last line ("* Give") looks like a list item
            assert sum(rule in f for f in flags) >= len(flags) - 1, flags
        else:
            assert all(rule in f for f in flags), (member, flags)
    assert not table[table["member"] != "base_cut"]["pass"].any()


def test_cut_mid_sentence_ends_on_a_word_inside_a_sentence():
    text = "The sun rose. The birds sang loudly in the tall green trees."
    cut = cut_mid_sentence(text)
    assert text.startswith(cut) and len(cut) < len(text) and not cut.endswith((".", "!", "?"))
    assert cut_mid_sentence("Hi.") == ""


# ---------------------------------------------------------------- rate

def test_rate_never_chooses_a_degenerate_sample():
    from pipeline.core.params import RateParams
    from pipeline.stages import rate

    def gen(pid, prompt, i, text, finished=True):
        return {"prompt_id": pid, "messages": [{"role": "user", "content": prompt}],
                "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "completion_index": i,
                "text": text, "generator": "m", "finished": finished}

    prompt = "Describe a sunny morning in lowercase letters."
    gens = [gen("p1", prompt, 0, prompt.lower()),                     # the echo: lowercase, and degenerate
            gen("p1", prompt, 1, "the sun is warm and the birds are awake."),
            gen("p1", prompt, 2, "The Sun Is Warm."),
            gen("p1", prompt, 3, "the sun rises over the quiet hills and", finished=False)]
    rows, m = rate.run(RateParams(source="s", unfinished="invalid"), gens, RULES)
    by_index = {c["completion_index"]: c for c in rows[0]["completions"]}
    assert by_index[0]["degenerate"] == ["prompt_copy"] and by_index[0]["annotations"]["instruction_following"]["Rating"] == "1"
    assert by_index[1]["annotations"]["instruction_following"]["Rating"] == "5"
    assert by_index[3]["annotations"]["instruction_following"]["Rating"] == "1"  # cut: a failed answer, as in evaluate
    assert m["degenerate_completions"] == 1 and m["degenerate_prompt_copy"] == 1
    assert by_index[3]["constraint_results"][0]["detail"] == "not credited: cut at max_new_tokens"
    rows, _ = rate.run(RateParams(source="s", unfinished="fail"), gens, RULES)  # the per-instruction rule instead
    assert "needs the whole answer" in rows[0]["completions"][3]["constraint_results"][0]["detail"]


# ---------------------------------------------------------------- openrelease score

def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_score_cli_matches_prompts_and_explains_failures(tmp_path, capsys):
    from pipeline.cli import main

    prompts = ROOT / "data" / "prompts" / "test.jsonl"
    rows = read_prompt_set(prompts)
    answers = [{"prompt": r["prompt"], "response": GOOD.get(r["id"], r["prompt"].lower())} for r in rows]
    resp = tmp_path / "resp.jsonl"
    resp.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(a) + "\r\n" for a in answers).encode())  # BOM + CRLF
    assert main(["score", "--responses", str(resp), "--out", str(tmp_path / "out")]) == 0
    score = json.loads((tmp_path / "out" / "score.json").read_text())
    assert score["n_prompts"] == len(rows) and score["n_missing"] == 0
    assert score["pass_rate"] == pytest.approx(sum(1 for r in rows if r["id"] in GOOD) / len(rows))
    assert score["failures"]["prompt_copy"] == len(rows) - len(GOOD)
    assert "pass_rate" in capsys.readouterr().out
    per = [json.loads(x) for x in (tmp_path / "out" / "per_prompt.jsonl").read_text().splitlines()]
    assert len(per) == len(rows) and sum(p["pass"] for p in per) == len(GOOD)

    _write(resp, answers[:-3])
    assert main(["score", "--responses", str(resp), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert f"3 of {len(rows)} prompts" in err and rows[-3]["prompt"][:30] in err and "Traceback" not in err
    assert main(["score", "--responses", str(resp), "--out", str(tmp_path / "o2"), "--allow-missing"]) == 0
    assert json.loads((tmp_path / "o2" / "score.json").read_text())["failures"]["empty"] == 3

    _write(resp, [answers[0], "{not json"])
    assert main(["score", "--responses", str(resp), "--out", str(tmp_path / "o3")]) == 1
    assert f"{resp}:2" in capsys.readouterr().err
    _write(resp, [{"prompt": rows[0]["prompt"], "response": 3}])
    assert main(["score", "--responses", str(resp), "--out", str(tmp_path / "o3")]) == 1
    assert f"{resp}:1: response" in capsys.readouterr().err


def test_score_equals_evaluate_headline_on_evaluate_answers(tmp_path):
    """What evaluate published for the policy, scored by `openrelease score`, gives evaluate's number."""
    import pandas as pd

    from pipeline.eval.score import score_file

    rows = read_prompt_set(ROOT / "data" / "prompts" / "test.jsonl")[:40]
    texts = [GOOD.get(r["id"], "Here is a reply that names a lake and a brave dog.") for r in rows]
    fins = [True] * 20 + [False] * 5 + [None] * 15
    s = score_set(rows, texts, fins, RULES)
    table = pd.DataFrame({"prompt": [r["prompt"] for r in rows], "response": texts, "finished": fins})
    resp = tmp_path / "r.jsonl"
    _write(resp, [{k: v for k, v in rec.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
                  for rec in table.to_dict("records")])
    prompts = _write(tmp_path / "p.jsonl", [{k: r[k] for k in ("id", "prompt", "instruction_id_list", "kwargs")}
                                            for r in rows])
    result, _ = score_file(resp, prompts, RULES, {"n_resamples": 200, "confidence_level": 0.95, "seed": 0})
    assert result["pass_rate"] == pytest.approx(float(s.passed.mean()))
    assert result["failures"] == s.rule_failures()


def test_release_gate_refuses_a_headline_at_or_below_the_floor():
    from pipeline.release.gates import trivial_floor

    assert trivial_floor({"pass_rate_policy": 0.33, "pass_rate_floor": 0.02}).status == "pass"
    low = trivial_floor({"pass_rate_policy": 0.02, "pass_rate_floor": 0.02})
    assert low.status == "fail" and "does not exceed the trivial-answer floor" in low.detail
    assert trivial_floor({"pass_rate_policy": 0.3}).status == "fail"  # no floor measured: nothing to trust
    assert trivial_floor({}, required=False).status == "skip"


def test_off_topic_and_reshuffled_prompt_words():
    prompt = "Explain why ice floats on water. Use fewer than 45 words."
    assert "off_topic" in failed(prompt, "apple river stone cloud.")
    assert "off_topic" in failed(prompt, "the lamp is near the garden and the bridge.")
    assert "off_topic" not in failed(prompt, "Frozen water is lighter than liquid water, so ice floats.")
    # a long answer may stay on topic in other words: only short ones are judged
    long_other = "Solid H2O has an open lattice, lower density than the liquid around it, " * 2
    assert "off_topic" not in failed(prompt, long_other.strip())
    assert "prompt_copy" in failed(prompt, "water ice why floats explain.")  # the prompt's own words, reshuffled
    ask = "Write a haiku about rain."
    assert failed(f"Repeat the request first, then answer. {ask}", f"{ask} Rain taps the tin roof.",
                  required=[[ask]]) == []


def test_phrases_the_instructions_require_are_not_copying():
    from pipeline.constraints.validity import required_texts

    prompt = ("Is the Pacific the largest ocean? Answer with one of the following options: "
              "My answer is yes., My answer is no., My answer is maybe.")
    req = required_texts(["detectable_format:constrained_response"], [{}])
    assert "prompt_copy" in failed(prompt, "My answer is yes.")
    assert failed(prompt, "My answer is yes.", required=[req]) == []
    assert required_texts(["startend:end_checker", "keywords:existence"],
                          [{"end_phrase": "Hope you can join!"}, {"keywords": ["lake", "brave"]}]) == \
        ["Hope you can join!", "lake", "brave"]
