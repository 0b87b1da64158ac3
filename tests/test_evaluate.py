"""The evaluate stage: readers, teacher-forced scoring, and run() end to end on tiny models with caching."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import DataError
from pipeline.core.params import EvaluateParams, GeneralPromptsParams
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, read_general_prompts, read_test_pairs
from pipeline.lm.scoring import completion_kl, completion_logps, tokenize_completion
from pipeline.stages.evaluate import Inputs, dpo_setting, run
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = ["pref_accuracy", "reward_margin", "pass_rate_base", "pass_rate_policy", "pass_rate_delta",
            "pass_rate_delta_ci_low", "pass_rate_delta_ci_high", "win_rate", "lc_win_rate", "length_ratio", "kl",
            "pass_rate_floor", "degenerate_rate_base", "degenerate_rate_policy", "degenerate_rate_delta",
            "repetition_rate_policy", "prompt_copy_rate_policy", "reused_rate_policy"]
WORDS = ("apple river stone cloud lamp garden music paper window forest candle bridge mountain ocean "
         "pencil silver morning winter harbor meadow").split()
TEMPLATES = ("The {} by the {} was quiet, and we watched the {} until evening.",
             "I like the {} more than the {}, but the {} is the best of all.",
             "Yesterday we walked past a {} and a {} before we found the {}.",
             "My friend keeps a {} on her desk next to a {} and a {}.",
             "Nobody expected a {} in the {}, least of all the {}.",
             "We painted the {} blue, then the {}, and finally the {}.",
             "There is a {} behind the {} where the {} used to be.",
             "She wrote about a {}, a {} and one small {}.")


def varied_answer(prompt: str) -> str:
    """A different plain English sentence per prompt that names the prompt's topic (one template for
    every prompt is a reused answer, one sharing no topic word is off topic; langdetect must read it as
    English for the case checkers)."""
    import random
    import re

    from pipeline.constraints.validity import INSTRUCTION_WORDS

    topic = next((w for w in re.findall(r"[a-z]{3,}", prompt.lower()) if w not in INSTRUCTION_WORDS), "garden")
    r = random.Random(prompt)
    return r.choice(TEMPLATES).format(topic, *r.sample(WORDS, 2))


# ---------------------------------------------------------------- readers

def test_general_prompts_mt_bench_arena_hard_and_alpaca_shapes(tmp_path):
    mt = read_general_prompts(shared_data("mt-bench", "mt_bench_question.jsonl"),
                              GeneralPromptsParams(field="turns", id_field="question_id", max_prompts=3))
    assert [r["id"] for r in mt] == ["81", "82", "83"]
    assert mt[0]["prompt"].startswith("Compose an engaging travel blog post")  # first turn only
    ah = read_general_prompts(shared_data("arena-hard", "arena-hard-v0.1_question.jsonl"),
                              GeneralPromptsParams(field="prompt", id_field="uid"))
    assert len(ah) == 500 and ah[0]["id"] == "328c149ed45a41c0b9d6f14659e63599"
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a colour.", "dataset": "x"},
                                  {"instruction": [{"role": "user", "content": "Hi"}], "dataset": "x"}]))
    rows = read_general_prompts(alpaca, GeneralPromptsParams(field="instruction"))
    assert rows == [{"id": "line0", "prompt": "Name a colour."}, {"id": "line1", "prompt": "Hi"}]
    shipped = read_general_prompts(ROOT / "data" / "prompts" / "general.jsonl",
                                   GeneralPromptsParams(field="prompt", id_field="id"))
    assert 16 <= len(shipped) <= 24


@pytest.mark.parametrize("line, match", [
    ({"text": "x"}, r"g.jsonl:2: has key 'prompt'"),
    ({"prompt": "  "}, r"g.jsonl:2: prompt: must be a non-blank string"),
    ({"prompt": [3]}, r"g.jsonl:2: prompt: must be a non-blank string or a list of turns"),
    ({"prompt": "dup", "id": "a"}, r"g.jsonl:2: unique id: 'a' appears twice"),
])
def test_general_prompts_errors_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"prompt": "fine", "id": "a"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=match):
        read_general_prompts(f, GeneralPromptsParams(field="prompt", id_field="id" if "id" in line else None))


def test_test_pairs_errors(tmp_path):
    import pandas as pd

    with pytest.raises(DataError, match="no such file"):
        read_test_pairs(tmp_path / "test.parquet", None)
    pd.DataFrame({"id": ["a"], "prompt": [[{"role": "user", "content": "q"}]]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"missing \['chosen', 'rejected'\]"):
        read_test_pairs(tmp_path / "t.parquet", None)


def test_dpo_setting_reads_train_or_falls_back_to_trl_default():
    assert dpo_setting({"beta": 0.3}, "beta") == 0.3
    from trl import DPOConfig

    assert dpo_setting({}, "beta") == DPOConfig.__dataclass_fields__["beta"].default


# ---------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with perturbed weights: a stand-in for a trained policy."""
    import torch

    from pipeline.lm.loading import load_causal_lm

    out = tmp_path_factory.mktemp("policy")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = load_causal_lm(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


CONVS = [([{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": "Hi there!"}]),
         ([{"role": "user", "content": "Count to five, please, slowly."}],
          [{"role": "assistant", "content": "One, two, three, four, five."}]),
         ([{"role": "user", "content": "?"}], [{"role": "assistant", "content": "A much longer answer " * 5}])]


def test_tokenize_completion_splits_where_trl_does(tiny):
    _, tok = tiny
    s = tokenize_completion(tok, *CONVS[0])
    assert tok.decode(s.ids[s.start:]) == "Hi there!<|im_end|>\n"
    assert tok.decode(s.ids[:s.start]).endswith("<|im_start|>assistant\n")
    cut = tokenize_completion(tok, *CONVS[0], max_length=s.start + 2)
    assert cut.ids == s.ids[:s.start + 2] and cut.n_completion == 2


def test_completion_logps_match_manual_and_are_batch_invariant(tiny):
    import torch

    model, tok = tiny
    items = [tokenize_completion(tok, p, c) for p, c in CONVS]
    batched = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=3)
    single = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=1)
    assert batched == pytest.approx(single, abs=1e-4)
    s = items[1]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([s.ids])).logits[0].float(), -1)
    manual = sum(float(logp[t - 1, s.ids[t]]) for t in range(s.start, len(s.ids)))
    assert batched[1] == pytest.approx(manual, abs=1e-4)
    assert all(v < 0 for v in batched)


def test_completion_kl_zero_for_same_model_positive_otherwise(tiny, other_model_dir):
    import torch

    from pipeline.lm.loading import load_causal_lm

    model, tok = tiny
    other = load_causal_lm(other_model_dir)
    items = [tokenize_completion(tok, p, c) for p, c in CONVS]
    same = completion_kl(model, model, items, pad_id=tok.pad_token_id, batch_size=2)
    assert all(abs(kl) < 1e-4 and n == it.n_completion for (kl, n), it in zip(same, items, strict=True))
    diff = completion_kl(other, model, items, pad_id=tok.pad_token_id, batch_size=2)
    s = items[0]
    with torch.inference_mode():
        a = torch.log_softmax(other(input_ids=torch.tensor([s.ids])).logits[0].float(), -1)[s.start - 1:-1]
        b = torch.log_softmax(model(input_ids=torch.tensor([s.ids])).logits[0].float(), -1)[s.start - 1:-1]
    assert diff[0][0] == pytest.approx(float((a.exp() * (a - b)).sum()), rel=1e-3)
    assert all(kl > 0 for kl, _ in diff)


def test_shared_prefix_scoring_matches_the_plain_forward(tiny, other_model_dir):
    """Completions of one prompt batched on one encoding of it, singletons on the shared system turn,
    logits only where scored: the same numbers as encoding every row whole."""
    from pipeline.lm.decode import PREFIX_MIN_TOKENS
    from pipeline.lm.loading import load_causal_lm
    from pipeline.lm.scoring import common_prefix, prompt_batches

    model, tok = tiny
    other = load_causal_lm(other_model_dir)
    prompt = [{"role": "user", "content": "Name three colours, then stop."}]
    answers = ["Red, green, blue.", "Blue.", "Red and green and a long tail of words " * 3, "Cyan, magenta, yellow."]
    convs = [(prompt, [{"role": "assistant", "content": a}]) for a in answers] + CONVS
    items = [tokenize_completion(tok, p, c) for p, c in convs]
    batches = prompt_batches(items, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    assert [sorted(b) for b in batches[:2]] == [[0, 1, 3], [2]]  # one prompt's completions together, shortest first
    assert common_prefix([items[i].ids for i in range(4, 7)]) >= PREFIX_MIN_TOKENS  # the chat template's system turn
    for bs in (1, 3, 8):
        fast = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=bs)
        plain = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=bs, share_prefix=False)
        assert fast == pytest.approx(plain, abs=1e-4)
        fast_kl = completion_kl(other, model, items, pad_id=tok.pad_token_id, batch_size=bs)
        plain_kl = completion_kl(other, model, items, pad_id=tok.pad_token_id, batch_size=bs, share_prefix=False)
        assert [n for _, n in fast_kl] == [n for _, n in plain_kl] == [it.n_completion for it in items]
        assert [k for k, _ in fast_kl] == pytest.approx([k for k, _ in plain_kl], rel=1e-4, abs=1e-5)


def test_kl_from_the_prompt_states_generation_kept_matches_encoding_the_prompts(tiny, other_model_dir, monkeypatch):
    """The KL pass reuses each model's prompt keys and values from its own greedy generation (prefilled in
    length groups behind a shared prefix) and encodes only the answers: the same KL as encoding all."""
    from pipeline.lm import scoring
    from pipeline.lm.generation import generate
    from pipeline.lm.loading import load_causal_lm

    real, reused_rows = scoring.forward_kept, []

    def spy(model, seqs, keep, **kw):
        if kw.get("states") is not None:
            reused_rows.append(len(seqs))
        return real(model, seqs, keep, **kw)

    monkeypatch.setattr(scoring, "forward_kept", spy)

    model, tok = tiny
    other = load_causal_lm(other_model_dir)
    prompts = [[{"role": "user", "content": t}] for t in
               ("Say hi.", "Count to five, please, slowly and clearly.", "?", "Name a colour, then a much longer list "
                "of fruits, vegetables and trees that grow in a cold climate.")]
    states = {}, {}
    answers = generate(other, tok, prompts, max_new_tokens=6, do_sample=False, batch_size=3, seed=0, desc="t",
                       prompt_states=states[0])
    generate(model, tok, prompts, max_new_tokens=6, do_sample=False, batch_size=4, seed=0, desc="t",
             prompt_states=states[1])
    assert len(states[0]) == len(states[1]) == len(prompts)
    items = [tokenize_completion(tok, c, [{"role": "assistant", "content": a[0]}]) for c, a in zip(prompts, answers, strict=True)]
    assert all(tuple(it.ids[:it.start]) in states[0] for it in items)
    for bs in (1, 4):
        reused = completion_kl(other, model, items, pad_id=tok.pad_token_id, batch_size=bs, prompt_states=states)
        plain = completion_kl(other, model, items, pad_id=tok.pad_token_id, batch_size=bs, share_prefix=False)
        assert [n for _, n in reused] == [n for _, n in plain]
        assert [k for k, _ in reused] == pytest.approx([k for k, _ in plain], rel=1e-4, abs=1e-5)
    assert sum(reused_rows) == 2 * 2 * len(items)  # both models, both batch sizes: every row from its states
    bf16 = {}
    generate(model, tok, prompts[:1], max_new_tokens=2, do_sample=False, batch_size=1, seed=0, desc="t",
             precision="bfloat16", prompt_states=bf16)
    assert bf16 == {}  # a bfloat16 copy's states are not the float32 model's


def test_shared_prefix_scoring_handles_a_prompt_cut_to_nothing(tiny):
    model, tok = tiny
    items = [tokenize_completion(tok, *CONVS[0]), tokenize_completion(tok, *CONVS[0], max_length=3)]
    fast = completion_logps(model, items, pad_id=tok.pad_token_id, batch_size=2)
    assert fast[1] == 0.0 and fast[0] == pytest.approx(
        completion_logps(model, items[:1], pad_id=tok.pad_token_id, batch_size=1, share_prefix=False)[0], abs=1e-4)


# ---------------------------------------------------------------- run() end to end

def _params(**over) -> EvaluateParams:
    raw = {"pref_max_pairs": None, "max_eval_prompts": None, "score_batch_size": 4,
           "generation": {"max_new_tokens": 8, "batch_size": 4},
           "general": {"field": "prompt", "id_field": "id", "max_prompts": None},
           "judge": {"kind": "local", "lc_c": 1.0, "lc_n_resamples": 100,
                     "local": {"model": None, "batch_size": 4, "max_length": 512}},
           "bootstrap": {"n_resamples": 500, "confidence_level": 0.95, "seed": 0, "min_clusters": 2}}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return EvaluateParams.model_validate(raw)


class FakeGenerate:
    """Stand-in for pipeline.lm.generation.generate: the policy shouts (and so passes `uppercase`)."""

    def __init__(self):
        self.calls, self.prompts = 0, 0

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, do_sample, batch_size, seed, desc, **kw):
        assert do_sample is False and max_new_tokens == 8
        self.calls += 1
        self.prompts += len(prompts)
        policy = "policy" in str(model.name_or_path)
        out = []
        for conv in prompts:
            text = varied_answer(conv[-1]["content"])
            out.append([text.upper() if policy else text])
        return out


@pytest.fixture
def eval_inputs(tmp_path, tiny_model_dir, other_model_dir) -> Inputs:
    import pandas as pd

    base, policy = tmp_path / "base", tmp_path / "policy"
    shutil.copytree(tiny_model_dir, base)
    shutil.copytree(other_model_dir, policy)
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": f"Good answer {i}."}],
              "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(5)]
    pd.DataFrame(pairs).to_parquet(tmp_path / "test.parquet")
    eval_rows = [{"id": f"e{i}", "prompt": f"Tell me about topic {i} in capital letters.",
                  "instruction_id_list": ["change_case:english_capital", "length_constraints:number_words"],
                  "kwargs": [{}, {"relation": "at least", "num_words": 3}]} for i in range(6)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    general = [{"id": f"g{i}", "prompt": f"Everyday question number {i}"} for i in range(4)]
    (tmp_path / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general))
    template = tmp_path / "pairwise.txt"
    shutil.copy(ROOT / "data" / "judge" / "pairwise.txt", template)
    return Inputs(base=base, policy=policy, test=tmp_path / "test.parquet", test_prompts=tmp_path / "eval.jsonl",
                  general_prompts=tmp_path / "general.jsonl", judge_template=template, beta=0.1, max_length=256)


class CountingModels(Models):
    def __init__(self):
        super().__init__()
        self.loads = 0

    def load(self, folder):
        if Path(folder).resolve() not in self._loaded:
            self.loads += 1
        return super().load(folder)


def test_run_end_to_end_then_cache_hits_then_judge_change(eval_inputs, tmp_path):
    import pandas as pd

    cache = EvalCache(tmp_path / "cache")
    gen = FakeGenerate()
    (out1 := tmp_path / "out1").mkdir()
    res = run(_params(), eval_inputs, cache, out1, models=CountingModels(), generate_fn=gen)
    m = res.metrics
    for key in REQUIRED:
        assert key in m and (math.isfinite(m[key]) or key.endswith(("_ci_low", "_ci_high"))), key
    assert gen.calls == 2 and gen.prompts == 2 * 10  # base and policy, 6 constraint + 4 general prompts each
    # only the shouting policy passes `uppercase`
    assert m["pass_rate_base"] == 0.0 and m["pass_rate_policy"] == 1.0 and m["pass_rate_delta"] == 1.0
    assert m["constraint_pass_rate_base"] == 0.5 and m["n_constraints"] == 12
    # every prompt moved from fail to pass: no resample differs, so no interval (NaN), never [1, 1]
    assert math.isnan(m["pass_rate_delta_ci_low"]) and math.isnan(m["pass_rate_delta_ci_high"])
    assert m["pass_rate_floor"] < m["pass_rate_policy"] and m["degenerate_rate_policy"] == 0.0
    assert m["pref_n"] == 5 and m["pref_n_truncated_away"] == 0 and 0 <= m["pref_accuracy"] <= 1
    assert m["n_wins"] + m["n_ties"] + m["n_losses"] == m["n_general_prompts"] == 4
    assert m["kl"] > 0 and 0 < m["length_ratio"]
    pref = pd.read_parquet(out1 / "preference.parquet")
    assert pref["reward_chosen"].tolist() == pytest.approx(
        (0.1 * (pref["logp_policy_chosen"] - pref["logp_ref_chosen"])).tolist())
    assert m["reward_margin"] == pytest.approx(pref["margin"].mean())
    cons = pd.read_parquet(out1 / "test.parquet")
    assert len(cons) == 6 and cons["pass_policy"].all() and not cons["pass_base"].any()
    assert len(pd.read_parquet(out1 / "general.parquet")) == 4

    # nothing changed: no generation, no model even loaded, identical metrics
    models2 = CountingModels()
    (out2 := tmp_path / "out2").mkdir()
    res2 = run(_params(), eval_inputs, cache, out2, models=models2, generate_fn=gen)
    assert gen.calls == 2 and models2.loads == 0
    assert json.dumps(res2.metrics, sort_keys=True) == json.dumps(m, sort_keys=True)  # NaN-aware (no-interval NaNs)

    # only the judge changed (its prompt cap, so its id): re-judge, regenerate nothing
    models3 = CountingModels()
    (out3 := tmp_path / "out3").mkdir()
    cache.hits.clear()
    cache.misses.clear()
    run(_params(judge={"local": {"model": None, "batch_size": 2, "max_length": 1024}}), eval_inputs, cache,
        out3, models=models3, generate_fn=gen)
    assert gen.calls == 2
    assert cache.misses["judgment"] == 8 and cache.misses["generation"] == 0 and cache.misses["logp"] == 0
    assert models3.loads == 1  # the judge (the base model) only

    # a changed template also re-judges
    eval_inputs.judge_template.write_text(eval_inputs.judge_template.read_text() + "\nBe brief.\n")
    cache.misses.clear()
    run(_params(), eval_inputs, cache, out3, models=CountingModels(), generate_fn=gen)
    assert cache.misses["judgment"] == 8 and gen.calls == 2


def test_run_with_identical_models_is_neutral(eval_inputs, tmp_path):
    shutil.rmtree(eval_inputs.policy)
    shutil.copytree(eval_inputs.base, eval_inputs.policy)
    res = run(_params(), eval_inputs, EvalCache(tmp_path / "c"), tmp_path, generate_fn=lambda m, t, p, **kw:
              [[f"the same answer to {c[-1]['content']}"] for c in p])
    m = res.metrics
    assert m["kl"] == pytest.approx(0, abs=1e-4) and m["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert m["win_rate"] == 0.5 and m["n_ties"] == 4  # identical answers: the orders cancel exactly
    assert m["pass_rate_delta"] == 0 and m["length_ratio"] == 1.0


# ---------------------------------------------------------------- the stage's wiring (_body)

def test_stage_writes_metrics_plots_lineage_and_links_the_logged_model(eval_inputs, tmp_path, monkeypatch):
    import mlflow
    import yaml

    import pipeline.lm.generation
    from pipeline.core.io import read_json
    from pipeline.core.stage import run_stage
    from pipeline.stages import evaluate

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    for name in ("eval.jsonl", "general.jsonl", "pairwise.txt"):
        shutil.copy(tmp_path / name, root / "data" / name)
    shutil.copytree(ROOT / "data" / "ifeval", root / "data" / "ifeval")
    shutil.copytree(ROOT / "data" / "prompts", root / "data" / "prompts")
    shutil.copytree(ROOT / "data" / "judge", root / "data" / "judge")  # paths.judge_labels
    shutil.copytree(eval_inputs.base, root / "models" / "base")
    shutil.copytree(eval_inputs.policy, root / "models" / "trained")
    (root / "dataset").mkdir()
    shutil.copy(eval_inputs.test, root / "dataset" / "test.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(test_prompts="data/eval.jsonl", general_prompts="data/general.jsonl",
                           judge_template="data/pairwise.txt", dataset="dataset", model="models/trained",
                           base_model="models/base")
    params["evaluate"] = _params(bootstrap={"n_resamples": 200}).model_dump(mode="json")
    params["train"]["dpo"]["beta"] = 0.2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(params["tracking"]["experiment"])
    model_id = mlflow.create_external_model(name="trained", experiment_id=exp.experiment_id).model_id
    (root / "lineage").mkdir()
    (root / "lineage" / "train.json").write_text(json.dumps({"stage": "train"}))
    from pipeline.core.runs import write_run_record  # the id is a run fact: the run record holds it

    write_run_record(root / ".openrelease" / "runs", "train", root / "lineage" / "train.json",
                     {"mlflow_model_id": model_id})
    monkeypatch.setattr(pipeline.lm.generation, "generate", FakeGenerate())

    run_stage(evaluate.STAGE, evaluate.READS, evaluate._body, params_file=root / "params.yaml", root=root)

    metrics = read_json(root / params["paths"]["metrics"] / "eval.json")
    for key in REQUIRED:
        assert key in metrics, key
    assert metrics["beta"] == 0.2  # read from train.dpo, not restated in evaluate
    for png in ("eval_pass_rates.png", "eval_win_rate.png"):
        assert (root / params["paths"]["plots"] / png).read_bytes()[:4] == b"\x89PNG"
    out = root / params["paths"]["eval_dir"]
    assert sorted(p.name for p in out.iterdir()) == ["dev.parquet", "general.parquet", "ifeval.parquet",
                                                     "judge_human.parquet", "panel.parquet", "preference.parquet",
                                                     "test.parquet"]
    assert metrics["n_ifeval_prompts"] == 32 and "ifeval_heldout_inst_strict_policy" in metrics
    assert any((root / params["paths"]["eval_cache"]).rglob("*.json"))
    record = read_json(root / "lineage" / "evaluate.json")
    assert "logged_model_id" not in record["extra"] and "cache" not in record["extra"]  # run facts, not lineage
    assert read_json(root / ".openrelease" / "runs" / "evaluate.json")["logged_model_id"] == model_id
    assert {"models/base", "models/trained", "dataset/test.parquet"} <= {a["path"] for a in record["inputs"]}
    linked = mlflow.get_logged_model(model_id)
    assert {m.key for m in linked.metrics} >= {"pref_accuracy", "pass_rate_delta", "win_rate", "kl"}


@pytest.mark.slow
def test_dvc_repro_evaluate_rejudges_without_regenerating(eval_inputs, tmp_path):
    """`dvc repro` of the evaluate stage in a fresh copy: the cache survives reruns (persist), and
    changing only the judge re-judges without generating or scoring again."""
    import subprocess

    from pipeline.core.io import read_json
    from tests.helpers import dvc, edit_params, make_project_copy

    project = make_project_copy(tmp_path / "proj")
    small = {"generation": {"max_new_tokens": 8, "batch_size": 8}, "general": {"max_prompts": 3},
             "bootstrap": {"n_resamples": 200}, "score_batch_size": 4}
    edit_params(project, evaluate=small)
    shutil.copytree(eval_inputs.base, project / "models" / "base")
    shutil.copytree(eval_inputs.policy, project / "models" / "trained")
    (project / "outputs" / "dataset").mkdir(parents=True)
    shutil.copy(eval_inputs.test, project / "outputs" / "dataset" / "test.parquet")
    (project / "lineage").mkdir(exist_ok=True)
    (project / "lineage" / "train.json").write_text("{}")
    git = ["git", "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run([*git, "commit", "-qam", "small evaluate"], cwd=project, check=True)

    first = dvc(project, "repro", "--single-item", "evaluate")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = read_json(project / "metrics" / "eval.json")
    assert all(k in metrics for k in REQUIRED)
    cache1 = read_json(project / "lineage" / "evaluate.json")["extra"]["cache"]
    assert cache1["cache_generation_misses"] > 0 and cache1["cache_generation_hits"] == 0

    edit_params(project, evaluate={"judge": {"local": {"max_length": 1024}}})
    second = dvc(project, "repro", "--single-item", "evaluate")
    assert second.returncode == 0, second.stderr[-3000:]
    cache2 = read_json(project / "lineage" / "evaluate.json")["extra"]["cache"]
    assert cache2["cache_generation_misses"] == 0 and cache2["cache_logp_misses"] == 0
    assert cache2["cache_kl_misses"] == 0 and cache2["cache_judgment_misses"] == 2 * 3

    again = dvc(project, "repro", "--single-item", "evaluate")
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout


def test_pairs_truncated_to_nothing_are_counted_not_scored(eval_inputs, tmp_path):
    from pipeline.stages.evaluate import preference

    ci = {"n_resamples": 200, "confidence_level": 0.95, "seed": 0}
    eval_inputs.max_length = 12  # the system prompt alone is longer: no completion token survives
    m, table = preference(Models(), eval_inputs, _params(), EvalCache(tmp_path / "c"), ci)
    assert m["pref_n"] == 0 and m["pref_n_truncated_away"] == 5 and math.isnan(m["pref_accuracy"])
    assert not table["scored"].any() and (table["tokens_chosen"] == 0).all()


def test_missing_trained_model_is_a_clear_error(eval_inputs, tmp_path):
    from pipeline.core.errors import SourceError

    shutil.rmtree(eval_inputs.policy)
    with pytest.raises(SourceError, match=r"policy: no safetensors model here \(run `dvc repro train`\)"):
        run(_params(), eval_inputs, EvalCache(tmp_path / "c"), tmp_path, generate_fn=FakeGenerate())


# ---------------------------------------------------------------- rules that keep the metrics honest

def test_an_empty_model_fails_every_default_prompt_and_shows_no_gain(eval_inputs, tmp_path):
    """The default evaluation sets (data/prompts/test.jsonl and the IFEval subset): a model that always
    answers "" passes nothing, gains nothing, and loses every judged pair."""
    eval_inputs.test_prompts = ROOT / "data" / "prompts" / "test.jsonl"
    eval_inputs.ifeval_prompts = ROOT / "data" / "ifeval" / "input_subset.jsonl"
    eval_inputs.train_prompts = ROOT / "data" / "prompts" / "train.jsonl"

    def gen(model, tokenizer, prompts, **kw):
        policy = "policy" in str(model.name_or_path)
        return [["" if policy else f"Sure. {c[-1]['content'][:40]}"] for c in prompts]

    m = run(_params(), eval_inputs, EvalCache(tmp_path / "c"), tmp_path, generate_fn=gen).metrics
    assert m["pass_rate_policy"] == 0.0 and m["constraint_pass_rate_policy"] == 0.0
    assert m["pass_rate_delta"] <= 0 and m["ifeval_prompt_strict_valid_policy"] == 0.0
    assert m["ifeval_prompt_strict_valid_delta"] <= 0 and m["test_ifeval_prompt_strict_valid_policy"] == 0.0
    assert m["test_ifeval_heldout_inst_strict_policy"] == 0.0 and m["n_test_ifeval_heldout_instructions"] > 0
    assert m["empty_rate_policy"] == 1.0 and m["empty_rate_base"] == 0.0
    assert m["win_rate"] == 0.0  # an empty answer loses without asking the judge
    assert m["n_judged_pairs"] == 0 and m["judge_reliable"] == 1  # nothing rested on the judge


def test_unfinished_answers_fail_and_are_counted(eval_inputs, tmp_path):
    def gen(model, tokenizer, prompts, *, stats=None, **kw):
        policy = "policy" in str(model.name_or_path)
        if stats is not None:  # the base model is always cut at max_new_tokens
            stats["finished"] = [[policy] for _ in prompts]
        return [[varied_answer(c[-1]["content"]).upper()] for c in prompts]

    m = run(_params(), eval_inputs, EvalCache(tmp_path / "c"), tmp_path, generate_fn=gen).metrics
    assert m["unfinished_rate_base"] == 1.0 and m["unfinished_rate_policy"] == 0.0
    assert m["pass_rate_base"] == 0.0 and m["pass_rate_policy"] == 1.0  # same text: only validity differs


def test_too_few_prompts_give_no_interval(eval_inputs, tmp_path):
    m = run(_params(bootstrap={"min_clusters": 10}), eval_inputs, EvalCache(tmp_path / "c"), tmp_path,
            generate_fn=FakeGenerate()).metrics
    assert m["pref_n_prompts"] == 5 and math.isfinite(m["pref_accuracy"])
    assert math.isnan(m["pref_accuracy_ci_low"]) and math.isnan(m["pref_accuracy_ci_high"])
    assert math.isnan(m["pass_rate_delta_ci_low"])  # 6 prompts < 10


def test_unreliable_judge_changes_no_gate_and_no_model_index_entry():
    from pipeline.core.params import MetricBound
    from pipeline.release.cards import model_index_metrics
    from pipeline.release.gates import eval_thresholds, regression

    base = {"pass_rate_policy": 0.4, "pass_rate_delta": 0.0, "length_ratio": 1.0, "pref_accuracy": 0.6,
            "judge_order_consistency": 0.1, "judge_min_order_consistency": 0.6}
    bad = {**base, "judge_reliable": 0, "win_rate": 0.01, "lc_win_rate": 0.01}
    thresholds = {"pass_rate_delta": MetricBound(min=-0.05), "win_rate": MetricBound(min=0.4)}
    assert eval_thresholds(bad, thresholds).status == "pass"
    assert "judge is unreliable" in eval_thresholds(bad, thresholds).detail
    tol = {"pass_rate_policy": 0.05, "win_rate": 0.05, "lc_win_rate": 0.05}
    assert regression(bad, {**bad, "win_rate": 0.9, "lc_win_rate": 0.9}, "v0", tol).status == "pass"
    assert not {"win_rate", "lc_win_rate"} & set(model_index_metrics(bad))
    good = {**bad, "judge_reliable": 1}  # the same numbers from a reliable judge do gate and index
    assert eval_thresholds(good, thresholds).status == "fail"
    assert regression(good, {**good, "win_rate": 0.9}, "v0", tol).status == "fail"
    assert {"win_rate", "lc_win_rate"} <= set(model_index_metrics(good))
    from pipeline.release.eval_card import judge_section

    assert "**The judge is unreliable**" in judge_section(bad, None, None)  # the card says why
    assert "none was run" in judge_section(bad, None, None)
    rep = {"file": "h.jsonl", "n": 9, "agreement": 0.5, "kappa": 0.1, "agreement_no_tie": 0.6,
           "judge": {"kind": "local"}, "template_sha256": "t"}
    assert "kappa 0.100" in judge_section(good, rep, "h.jsonl", {"id": {"kind": "local"}, "template_sha256": "t"})
    assert "kappa 0.100" not in judge_section(good, rep, "h.jsonl", {"id": {"kind": "openai"}, "template_sha256": "t"})


def test_model_index_has_measured_metrics_with_datasets_and_intervals():
    from pipeline.release.cards import model_index_metrics, model_index_results
    from pipeline.release.manifest import ReleaseInfo

    m = {"pref_accuracy": 0.6, "pref_accuracy_ci_low": 0.5, "pref_accuracy_ci_high": 0.7, "pref_n": 60,
         "pref_n_prompts": 60, "n_ties": 3, "ifeval_prompt_strict_policy": 0.2, "ifeval_prompt_strict_policy_ci_low":
         float("nan"), "ifeval_prompt_strict_policy_ci_high": float("nan"), "kl": 0.1, "lc_win_rate_se": 0.0,
         "judge_reliable": 1, "lc_win_rate": 0.5}
    assert set(model_index_metrics(m)) == {"pref_accuracy", "ifeval_prompt_strict_policy", "lc_win_rate"}
    info = ReleaseInfo(version="v1", model_repo="org/model", dataset_repo="org/pairs", endpoint="https://hf.co",
                       commit="0" * 40, dirty=False)
    res = {r.metric_name: r for r in model_index_results(m, info)}
    pref = res["Preference accuracy of the implicit DPO reward (chosen > rejected)"]
    assert pref.metric_args["ci_low"] == 0.5 and pref.dataset_config == "default" and pref.metric_type == "accuracy"
    ifeval = res["IFEval prompt-level strict accuracy"]
    assert ifeval.dataset_config == "ifeval_prompts" and ifeval.dataset_name.startswith("IFEval subset")
    assert ifeval.metric_args is None  # no interval to give
    assert res["Length-controlled win rate against the base model (AlpacaEval 2 GLM)"].dataset_config == "general_prompts"
    assert {r.dataset_type for r in res.values()} == {"org/pairs"} and {r.dataset_revision for r in res.values()} == {"v1"}


def test_ifeval_subset_is_the_seeded_selection():
    from pipeline.eval.ifeval_subset import read_meta, seeded_subset

    src = ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
    if not src.is_file():
        pytest.skip("../shared/data/ifeval is absent (see data/ifeval/README.md for the source)")
    sub = ROOT / "data" / "ifeval" / "input_subset.jsonl"
    meta = read_meta(sub)
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    want = seeded_subset(rows, meta["size"], meta["seed"])
    assert [json.loads(x) for x in sub.read_text().splitlines()] == want


def test_held_out_ids_are_the_ones_training_never_uses():
    from pipeline.eval.ifeval_eval import training_ids

    ids = training_ids(ROOT / "data" / "prompts" / "train.jsonl")
    assert "change_case:english_lowercase" in ids
    assert "combination:repeat_prompt" not in ids  # held out: reported separately
