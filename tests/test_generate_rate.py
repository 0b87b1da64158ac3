"""Stages generate and rate: on-policy sampling on the tiny model, IFEval ratings in the UltraFeedback layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.constraints.validity import Rules
from pipeline.core.errors import DataError
from pipeline.core.params import GenerateParams, RateParams
from pipeline.stages import generate, rate

ROOT = Path(__file__).resolve().parents[1]
LOWER = "change_case:english_lowercase"
PROMPTS = [
    {"id": "p1", "line": 1, "prompt": "Say hi in lowercase.", "instruction_id_list": [LOWER], "kwargs": [{}]},
    {"id": "p2", "line": 2, "prompt": "Name a fruit, no commas, under 5 words.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "less than", "num_words": 5}]},
    {"id": "p3", "line": 3, "prompt": "Give JSON.", "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]},
]
SENTENCE = "the weather is lovely today and we are going for a long walk in the park"
GEN = GenerateParams(samples_per_prompt=2, max_new_tokens=6, temperature=1.0, top_p=0.95, batch_size=4, seed=7,
                     backend="transformers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two spinning OpenMP threads on a shared, loaded 2-core machine slow tiny models ~10x. Module scope:
    the module-scoped `generated` decodes with the tests' thread count (it can change a sampled token)."""
    from pipeline.lm import generation

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "available_cpus", lambda: 1)
        yield


@pytest.fixture(scope="module")
def generated(tiny_model_dir):
    return generate.run(GEN, PROMPTS, tiny_model_dir, generator="tiny-llama")


def test_generate_run_rows(generated):
    rows, stats = generated
    assert [(r["prompt_id"], r["completion_index"]) for r in rows] == [(p, i) for p in ("p1", "p2", "p3") for i in (0, 1)]
    r = rows[2]
    assert r["messages"] == [{"role": "user", "content": PROMPTS[1]["prompt"]}]
    assert (r["instruction_id_list"], r["kwargs"]) == (PROMPTS[1]["instruction_id_list"], PROMPTS[1]["kwargs"])
    assert r["prompt_line"] == 2
    assert r["generator"] == "tiny-llama" and isinstance(r["text"], str) and isinstance(r["finished"], bool)
    assert r["decoding"] == {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": None,
                             "max_new_tokens": 6, "seed": 7, "backend": "transformers",
                             "cache": "preallocated", "precision": "float32"}  # the loop and precision made the rows
    assert (stats["prompts"], stats["completions"]) == (3, 6) and stats["new_tokens"] > 0
    # a random tiny model rarely samples EOS within 6 tokens; cut ones have exactly the budget
    assert stats["truncated_completions"] == sum(not r["finished"] for r in rows)


def test_generate_max_prompts_and_generator_name(tiny_model_dir, tmp_path):
    rows, stats = generate.run(GEN.model_copy(update={"max_prompts": 1, "samples_per_prompt": 2}), PROMPTS, tiny_model_dir)
    assert {r["prompt_id"] for r in rows} == {"p1"} and stats["prompts"] == 1
    assert rows[0]["generator"] == Path(tiny_model_dir).name  # no SOURCE.json: the folder name
    (tmp_path / "SOURCE.json").write_text(json.dumps({"name": "SmolLM2-135M-Instruct"}))
    assert generate.generator_name(tmp_path) == "SmolLM2-135M-Instruct"


def test_generate_bfloat16_is_recorded_and_seeded(tiny_model_dir):
    """Opt-in bfloat16: every row says so, and the same seed and inputs give the same completions."""
    p = GEN.model_copy(update={"precision": "bfloat16"})
    rows, _ = generate.run(p, PROMPTS, tiny_model_dir)
    assert {r["decoding"]["precision"] for r in rows} == {"bfloat16"}
    assert [r["text"] for r in generate.run(p, PROMPTS, tiny_model_dir)[0]] == [r["text"] for r in rows]


def test_ctranslate2_refuses_a_precision(monkeypatch):
    import importlib.util

    from pipeline.core.errors import ParamsError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ctranslate2" else real(name, *a))
    with pytest.raises(ParamsError, match="ctranslate2 takes generate.quantization"):
        generate.run(GEN.model_copy(update={"backend": "ctranslate2", "precision": "bfloat16"}), PROMPTS, "unused",
                     converted_models="unused")


def test_vllm_backend_needs_vllm_and_cuda(monkeypatch):
    from pipeline.core.errors import ParamsError
    from pipeline.lm import generation

    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    assert generate.choose_backend(GEN.model_copy(update={"backend": "auto"})) == "transformers"
    with pytest.raises(ParamsError, match="needs the vllm package and a CUDA device"):
        generate.choose_backend(GEN.model_copy(update={"backend": "vllm"}))


@pytest.mark.parametrize(("fraction", "expected"), [(0, 1), (1 / 3, 2), (0.5, 3), (2 / 3, 4), (1, 5), (0.25, 2), (0.75, 4)])
def test_rating_scale(fraction, expected):
    assert rate.rating(fraction) == expected


def test_rate_completion_layout():
    c = rate.rate_completion(SENTENCE + ", then home", "p", [LOWER, "punctuation:no_comma"], [{}, {}], "m", 3)
    ann = c["annotations"]
    assert set(ann) == {"instruction_following", "honesty", "truthfulness", "helpfulness"}
    assert ann["instruction_following"]["Rating"] == "3"  # 1 of 2 met
    assert ann["instruction_following"]["Rationale"] == (
        f"Followed 1 of 2 verifiable instructions: {LOWER}: followed; punctuation:no_comma: not followed.")
    assert ann["honesty"] == {"Rating": "N/A", "Rationale": rate.NOT_RATED}
    assert set(ann["truthfulness"]) == set(ann["helpfulness"]) == {"Type", "Rationale", "Rating", "Rationale For Rating"}
    assert ann["truthfulness"]["Rating"] == ann["helpfulness"]["Rating"] == "N/A"
    assert c["fine-grained_score"] == 3.0 and c["overall_score"] is None
    assert c["pass_fraction"] == 0.5 and c["completion_index"] == 3 and c["model"] == "m" and c["response"] == SENTENCE + ", then home"
    assert [r["ok"] for r in c["constraint_results"]] == [True, False]


def _gen_rows(texts: dict[str, list[str]], finished: dict[tuple[str, int], bool | None] | None = None) -> list[dict]:
    byid = {p["id"]: p for p in PROMPTS}
    return [{"prompt_id": pid, "prompt_line": 1, "messages": [{"role": "user", "content": f"prompt {pid}"}],
             "instruction_id_list": byid[pid]["instruction_id_list"], "kwargs": byid[pid]["kwargs"],
             "completion_index": i, "text": t, "finished": (finished or {}).get((pid, i), True), "generator": "g",
             "decoding": {"seed": 1}}
            for pid, ts in texts.items() for i, t in enumerate(ts)]


# The constraint-rating fixtures below use one-word answers on purpose; the degeneration rules (too_short
# and off_topic among them: "apple" to "prompt p2") have their own tests in tests/test_validity.py, so
# here they are relaxed.
ONE_WORD_OK = Rules(min_words=1, off_topic_max_words=0)


def test_rate_run_groups_and_metrics():
    rows, m = rate.run(RateParams(source="src", unfinished="fail"), _gen_rows({
        "p1": [SENTENCE, SENTENCE.title(), SENTENCE + " again"],  # pass, fail, pass -> pass-and-fail
        "p2": ["apple", "apple, pear", "one two three four five six"],  # 1, 1/2, 1/2 -> pass-and-fail
        "p3": ["nope", "still no"],                           # both fail -> not contrastive
    }), ONE_WORD_OK)
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"]
    r = rows[1]
    assert (r["source"], r["instruction"], r["models"]) == ("src", "prompt p2", ["g", "g", "g"])
    assert r["correct_answers"] == r["incorrect_answers"] == ["None"]
    assert [c["annotations"]["instruction_following"]["Rating"] for c in r["completions"]] == ["5", "3", "3"]
    assert m["prompts"] == 3 and m["completions"] == 8
    assert m["prompts_pass_and_fail"] == 2 and m["contrastive_prompts"] == 2
    assert m["pass_rate_detectable_format/json_format"] == 0.0
    assert m["pass_rate_change_case/english_lowercase"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["truncated_completions"] == m["excluded_unfinished_completions"] == 0
    assert m["mean_pass_fraction"] == pytest.approx((1 + 0 + 1 + 1 + 0.5 + 0.5 + 0 + 0) / 8, abs=1e-4)


def test_rated_rows_read_by_the_ultrafeedback_reader(generated, tmp_path):
    """The ingest side's reader for the real UltraFeedback layout reads what `rate` writes."""
    from pipeline.core.io import atomic_write_jsonl

    ultrafeedback = pytest.importorskip("pipeline.data.formats.ultrafeedback")
    rows, _ = rate.run(RateParams(source="openrelease_constraints", unfinished="fail"), generated[0])
    path = tmp_path / "rated.jsonl"
    atomic_write_jsonl(path, rows)
    cfg = type("Cfg", (), {"name": "onpolicy", "license": "Apache-2.0", "split": None, "max_rows": None})()
    got = list(ultrafeedback.read(str(path), cfg))
    assert len(got) == 3
    assert got[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]["prompt"]}]
    for g, r in zip(got, rows, strict=True):
        assert [c["content"] for c in g["completions"]] == [c["response"] for c in r["completions"]]
        for c, rc in zip(g["completions"], r["completions"], strict=True):
            assert c["generator"] == "tiny-llama"
            assert c["ratings"]["instruction_following"] == float(rc["annotations"]["instruction_following"]["Rating"])
            assert c["ratings"]["honesty"] is None and c["ratings"]["helpfulness"] is None
            assert c["finished"] is rc["finished"] and isinstance(c["finished"], bool)   # the generator's flag, carried


CUT = {("p2", 0): False, ("p2", 1): False, ("p1", 1): None}


def test_rate_unfinished_fail_credits_no_whole_answer_instruction():
    """A cut completion passes no instruction that the rest of the answer could break (issue 11)."""
    rows, m = rate.run(RateParams(source="s", unfinished="fail"), _gen_rows({"p1": [SENTENCE, SENTENCE], "p2": ["apple", "pear"]}, CUT),
                        ONE_WORD_OK)
    p2 = rows[1]["completions"]
    # "apple" has no comma and < 5 words, but both need the whole answer: not credited when cut
    assert [r["ok"] for r in p2[0]["constraint_results"]] == [False, False]
    assert p2[0]["constraint_results"][0]["detail"].startswith("not credited: cut at max_new_tokens")
    assert p2[0]["annotations"]["instruction_following"]["Rating"] == "1"
    # finished unknown (None): SENTENCE stops mid-sentence, so the validity text rule counts it as cut
    assert rows[0]["completions"][1]["pass_fraction"] == 0.0 and rows[0]["completions"][1]["finished"] is False
    assert (m["truncated_completions"], m["finish_unknown_completions"], m["excluded_unfinished_completions"]) == (3, 1, 0)
    # ... and one that ends like a finished answer is rated as it stands
    rows, _ = rate.run(RateParams(source="s", unfinished="fail"), _gen_rows({"p1": [SENTENCE, SENTENCE + "."]}, CUT),
                       ONE_WORD_OK)
    assert rows[0]["completions"][1]["pass_fraction"] == 1.0
    # the same texts finished would pass both
    rows, _ = rate.run(RateParams(source="s", unfinished="fail"), _gen_rows({"p2": ["apple", "pear"]}), ONE_WORD_OK)
    assert rows[0]["completions"][0]["pass_fraction"] == 1.0


def test_rate_unfinished_exclude_drops_and_counts():
    rows, m = rate.run(RateParams(source="s", unfinished="exclude"),
                       _gen_rows({"p1": [SENTENCE, SENTENCE + ".", "x"], "p2": ["apple", "pear"]}, {**CUT, ("p1", 2): False}))
    assert [r["id"] for r in rows] == ["p1"]  # p2 had no finished completion left
    assert [c["completion_index"] for c in rows[0]["completions"]] == [0, 1]
    assert m["excluded_unfinished_completions"] == 3 and m["prompts_left_without_completions"] == 1
    assert (m["prompts_in"], m["prompts"], m["completions"], m["truncated_completions"]) == (2, 1, 2, 3)


def test_monotone_instructions_judged_on_the_cut_prefix():
    from pipeline.constraints.truncation import needs_whole_answer

    assert not needs_whole_answer("keywords:existence", {"keywords": ["x"]})
    assert not needs_whole_answer("length_constraints:number_words", {"relation": "at least", "num_words": 9})
    assert needs_whole_answer("length_constraints:number_words", {"relation": "less than", "num_words": 9})
    assert needs_whole_answer("keywords:letter_frequency", {"letter": "a", "let_frequency": 2, "let_relation": "less than"})
    assert not needs_whole_answer("keywords:letter_frequency", {"letter": "a", "let_frequency": 2, "let_relation": "at least"})
    for iid in ("startend:end_checker", "detectable_format:json_format", "punctuation:no_comma", "startend:quotation",
                "length_constraints:number_paragraphs", "change_case:english_lowercase"):
        assert needs_whole_answer(iid, {})


def _write(tmp_path, rows: list) -> Path:
    p = tmp_path / "generations.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda r: "{broken", r"generations.jsonl:2: valid JSON"),
    (lambda r: {**r, "instruction_id_list": ["rhyme"]}, r"generations.jsonl:2: instructions: instruction 0: unknown instruction id 'rhyme'"),
    (lambda r: {**r, "kwargs": []}, r"generations.jsonl:2: instructions: kwargs must be a list of 1 objects"),
    (lambda r: {k: v for k, v in r.items() if k != "kwargs"}, r"generations.jsonl:2: generation row key 'kwargs'"),
    (lambda r: {k: v for k, v in r.items() if k != "text"}, r"generations.jsonl:2: generation row key 'text'"),
    (lambda r: {**r, "completion_index": "1"}, r"generations.jsonl:2: generation row key 'completion_index'"),
    (lambda r: {**r, "messages": [{"role": "assistant", "content": "x"}]}, r"generations.jsonl:2: messages"),
    (lambda r: {**r, "completion_index": 0}, r"generations.jsonl:2: unique completion: 'p1' completion 0 already on line 1"),
    (lambda r: {**r, "instruction_id_list": ["punctuation:no_comma"]}, r"generations.jsonl:2: one prompt per id"),
    (lambda r: {**r, "finished": "yes"}, r"generations.jsonl:2: generation row key 'finished'"),
])
def test_read_generations_bad_lines(tmp_path, mutate, match):
    good = _gen_rows({"p1": ["a", "b"]})
    with pytest.raises(DataError, match=match):
        rate.read_generations(_write(tmp_path, [good[0], mutate(good[1])]))


def _stage_params(tmp_path: Path, tiny_model_dir: Path, prompts: list[str]) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["base_model"] = str(tiny_model_dir)
    raw["paths"]["train_prompts"] = "prompts.jsonl"
    raw["generate"].update(samples_per_prompt=2, max_new_tokens=4, batch_size=8, max_prompts=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "prompts.jsonl").write_text("".join(line + "\n" for line in prompts), encoding="utf-8")
    return tmp_path / "params.yaml"


def test_stages_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    """generate then rate through run_stage: outputs, metrics files and lineage records."""
    from pipeline.core.stage import run_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = [json.dumps({k: p[k] for k in ("id", "prompt", "instruction_id_list", "kwargs")}) for p in PROMPTS]
    params_file = _stage_params(tmp_path, tiny_model_dir, lines)
    run_stage(generate.STAGE, generate.READS, generate._body, params_file=params_file, root=tmp_path)
    run_stage(rate.STAGE, rate.READS, rate._body, params_file=params_file, root=tmp_path)
    raw = yaml.safe_load(params_file.read_text())
    gen_lines = (tmp_path / raw["paths"]["generations"]).read_text().splitlines()
    rated = [json.loads(x) for x in (tmp_path / raw["paths"]["rated"]).read_text().splitlines()]
    assert len(gen_lines) == 6 and [r["id"] for r in rated] == ["p1", "p2", "p3"]
    gm = json.loads((tmp_path / raw["paths"]["metrics"] / "generate.json").read_text())
    rm = json.loads((tmp_path / raw["paths"]["metrics"] / "rate.json").read_text())
    assert gm["completions"] == 6 and "tokens_per_s" not in gm  # speed is a run fact, not a DVC metric
    assert json.loads((tmp_path / ".openrelease" / "runs" / "generate.json").read_text())["metrics"]["tokens_per_s"] > 0
    assert rm["completions"] == 6 and rm["prompts"] == 3
    lineage = json.loads((tmp_path / raw["paths"]["lineage"] / "rate.json").read_text())
    assert lineage["inputs"][0]["rows"] == 6 and lineage["outputs"][0]["rows"] == 3


def test_generate_stage_bad_prompt_line(tmp_path, tiny_model_dir, monkeypatch):
    """The stage stops on the first bad row with its line (every other rule: tests/test_constraints.py, test_ifeval.py)."""
    from pipeline.core.stage import run_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = json.dumps({"id": "a", "prompt": "hi", "instruction_id_list": [LOWER], "kwargs": [{}]})
    bad = json.dumps({"id": "z", "prompt": "x", "instruction_id_list": [LOWER, "haiku"], "kwargs": [{}, {}]})
    params_file = _stage_params(tmp_path, tiny_model_dir, [good, bad, "{not json"])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: instructions: instruction 1: unknown instruction id 'haiku'"):
        run_stage(generate.STAGE, generate.READS, generate._body, params_file=params_file, root=tmp_path)
    assert not (tmp_path / yaml.safe_load(params_file.read_text())["paths"]["generations"]).exists()
