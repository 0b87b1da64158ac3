"""Stage build and its helpers: binarization, MinHash/LSH against datasketch, decontamination, the pairs
suite (one failing fixture per rule), determinism, and ingest -> validate -> build on real files."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.core.params import DataParams, PairRules, load_params
from pipeline.data import decontamination as decontam
from pipeline.data import dedup
from pipeline.data.binarization import pairs_for, score
from pipeline.stages import build, ingest, validate
from tests.conftest import ROOT, shared_data

PARAMS = load_params(ROOT / "params.yaml")


# --- binarization ---------------------------------------------------------------------------------

def test_score_is_mean_of_available_ratings():
    assert score([4.0, None, 2.0]) == 3.0 and score([None, None]) is None


@pytest.mark.parametrize("method, scores, margin, pairs, dropped", [
    ("best_vs_worst", [3.0, 5.0, 1.0, 5.0], 0.0, [(1, 2)], {}),
    ("best_vs_worst", [2.0, 2.0, None], 0.0, [], {"tie": 1, "unrated": 1}),
    ("best_vs_worst", [2.0, 2.5], 1.0, [], {"below_margin": 1}),
    ("best_vs_worst", [None, 4.0], 0.0, [], {"too_few_rated": 1, "unrated": 1}),
    ("all_pairs_above_margin", [1.0, 3.0, 3.0, 3.5], 1.0, [(1, 0), (2, 0), (3, 0)],
     {"tie": 1, "below_margin": 2}),
    ("best_vs_random", [4.0, 4.0], 0.0, [], {"tie": 1}),
    ("best_vs_random", [4.0, 3.5], 1.0, [], {"below_margin": 1}),
])
def test_pairs_for(method, scores, margin, pairs, dropped):
    got, why = pairs_for(scores, method, margin, 42, "h")
    assert got == pairs
    assert {k: v for k, v in why.items() if v} == dropped


def test_best_vs_random_is_seeded_and_picks_only_lower_scores():
    scores = [5.0, 1.0, 2.0, 3.0, 5.0]
    picks = {pairs_for(scores, "best_vs_random", 0.0, 42, f"h{i}")[0][0] for i in range(50)}
    assert {c for c, _ in picks} == {0} and {r for _, r in picks} == {1, 2, 3}
    assert pairs_for(scores, "best_vs_random", 0.0, 42, "h1") == pairs_for(scores, "best_vs_random", 0.0, 42, "h1")
    assert {pairs_for(scores, "best_vs_random", 2.5, 7, f"h{i}")[0][0][1] for i in range(30)} == {1, 2}


# --- MinHash, LSH, decontamination ----------------------------------------------------------------

def _docs(n: int, seed: int = 0, shortest: int = 1) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(1500)]
    docs: list[list[str]] = []
    for _ in range(n):
        if docs and rng.random() < 0.2:
            d = list(rng.choice(docs))
            d[rng.randrange(len(d))] = rng.choice(vocab)
        else:
            d = rng.choices(vocab, k=rng.randint(shortest, 30))
        docs.append(d)
    return docs


def test_minhash_signatures_equal_datasketch():
    from datasketch import MinHash

    hasher = dedup.WordHasher()
    ids = [hasher.ids(d) for d in _docs(300)]
    perms = dedup.permutations(64, 42)
    sig = dedup.minhash_signatures(ids, 3, perms, chunk=97)  # chunks split documents: still exact
    h32, doc = dedup.shingles(ids, 3)
    for i in range(0, 300, 7):
        m = MinHash(num_perm=64, seed=42, hashfunc=int)
        m.update_batch(h32[doc == i].tolist())
        assert np.array_equal(m.hashvalues, sig[i])


def test_near_duplicates_equal_a_sequential_datasketch_lsh():
    from datasketch import LeanMinHash, MinHashLSH

    hasher = dedup.WordHasher()
    sigs = dedup.minhash_signatures([hasher.ids(d) for d in _docs(1500, seed=3, shortest=15)], 2, dedup.permutations(64, 42))
    for threshold in (0.6, 0.9):
        lsh, kept, expected = MinHashLSH(threshold=threshold, num_perm=64), {}, {}
        for i, s in enumerate(sigs):
            m = LeanMinHash(seed=42, hashvalues=s, scheme="affine32")
            cands = [(j, float(np.mean(kept[j] == s))) for j in lsh.query(m)]
            best = max((c for c in cands if c[1] >= threshold), key=lambda c: (c[1], -c[0]), default=None)
            if best is None:
                lsh.insert(i, m)
                kept[i] = s
            else:
                expected[i] = best
        got = dedup.near_duplicates(sigs, threshold, 64)
        assert got == expected and len(got) > 10


def test_eval_index_exact_ngram_and_short_texts():
    index = decontam.EvalIndex(n=13, min_words=8)
    long_q = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."
    index.add("mt", "81", long_q)
    index.add("mt", "81#turn2", "Rewrite your previous response. Start every sentence with the letter A.")
    index.add("mt", "x", "Hello there")
    docs = [
        "Please COMPOSE an engaging travel blog post about a recent trip to Hawaii highlighting cultural stuff",
        "Now: rewrite your previous response; start every sentence with the letter a, thanks",
        "hello,   THERE",
        "hello there friend",
        "An engaging travel blog post about a recent trip to Hawaii",  # only 11 words of it
    ]
    ws = [dedup.words(d) for d in docs]
    got = index.match(ws, [index.hasher.ids(w) for w in ws])
    assert [m.kind if m else None for m in got] == ["13-gram", "11-gram", "exact", None, None]
    assert got[0].item == "81" and got[1].item == "81#turn2"


# --- the pairs suite --------------------------------------------------------------------------------

def _pairs(n: int = 6):
    from datasets import Dataset

    rows = []
    for i in range(n):
        rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
                     "chosen": [{"role": "assistant", "content": "good answer"}],
                     "rejected": [{"role": "assistant", "content": "bad answer"}],
                     "chosen_cut": False, "rejected_cut": None,   # null: the source does not say
                     "score_chosen": 1.0, "score_rejected": 0.0, "source": "s", "source_row": f"f.jsonl:{i + 1}",
                     "rule": "best_vs_worst", "prompt_hash": f"h{i}", "split": "test" if i == 0 else "train"})
    return rows, Dataset


def _break(rows: list[dict], rule: str, i: int) -> None:
    if rule == "text_not_blank":
        rows[i]["chosen"][0]["content"] = " "
    elif rule == "chosen_differs":
        rows[i]["rejected"][0]["content"] = "good answer "
    elif rule == "token_length":
        rows[i]["chosen"][0]["content"] = "word " * 400
    elif rule == "unique_ids":
        rows[i]["id"] = rows[i - 1]["id"]
    elif rule == "prompts_disjoint_across_splits":
        rows[i]["prompt_hash"] = rows[0]["prompt_hash"]  # row 0 is in test, row i in train


PAIR_RULES = [r for r in PairRules.model_fields if r != "required_columns"]


@pytest.fixture(scope="module")
def counter(smollm_tokenizer_dir):
    from pipeline.data.pair_checks import TokenCounter

    return TokenCounter(smollm_tokenizer_dir, 128)


@pytest.mark.parametrize("rule", PAIR_RULES)
def test_pairs_suite_each_rule_fails_with_file_line(rule, counter, tmp_path):
    rows, Dataset = _pairs()
    _break(rows, rule, 3)
    v = PARAMS.validate_.model_copy(update={"max_length": 128, "pairs": PairRules(
        **{r: ("fail" if r == rule else "quarantine") for r in PairRules.model_fields})})
    outcome, _, _ = build.check_pairs(Dataset.from_list(rows), counter, v, None, "report.json", 4)
    assert isinstance(outcome.error, DataError)
    assert re.match(rf"f\.jsonl:\d: \[s\] {rule}: .+\(\d pair\(s\) break this rule", str(outcome.error))


def test_pairs_suite_refuses_a_cut_flag_that_is_not_a_boolean(counter):
    rows, Dataset = _pairs()
    rows[2]["rejected_cut"] = "yes"
    v = PARAMS.validate_.model_copy(update={"pairs": PairRules(**{r: "fail" for r in PairRules.model_fields})})
    outcome, _, _ = build.check_pairs(Dataset.from_list(rows), counter, v, None, "report.json", 4)
    assert "f.jsonl:3: [s] required_columns" in str(outcome.error)
    rows[2]["rejected_cut"] = True
    outcome, _, _ = build.check_pairs(Dataset.from_list(rows), counter, v, None, "report.json", 4)
    assert outcome.error is None


def test_pairs_suite_required_columns(counter):
    rows, Dataset = _pairs()
    for r in rows:
        del r["rule"]
    rows[2]["source"] = None
    v = PARAMS.validate_.model_copy(update={"pairs": PairRules(**{r: "fail" for r in PairRules.model_fields})})
    outcome, _, _ = build.check_pairs(Dataset.from_list(rows), counter, v, None, "report.json", 4)
    assert "required_columns: a contract column is missing or null" in str(outcome.error)


def test_pairs_suite_quarantine_mode_sets_aside_each_broken_pair(counter, tmp_path):
    rows, Dataset = _pairs(12)
    broken = {}
    for k, rule in enumerate(PAIR_RULES):
        _break(rows, rule, 2 + 2 * k)
        broken[2 + 2 * k] = rule
    v = PARAMS.validate_.model_copy(update={"max_length": 128, "max_quarantine_fraction": 1.0,
                                            "pairs": PairRules(**{r: "quarantine" for r in PairRules.model_fields})})
    outcome, frame, _ = build.check_pairs(Dataset.from_list(rows), counter, v, tmp_path, "report.json", 5)
    got = {i: rules for i, rules in outcome.quarantined.items()}
    for i, rule in broken.items():
        assert rule in got[i]
    # unique_ids and the split rule flag both members of the pair of rows they relate
    assert set(got) == set(broken) | {7, 0}
    assert frame.loc[6, "tokens_max"] > 128 and (tmp_path / "docs" / "index.html").is_file()
    assert sum(json.loads((tmp_path / "report.json").read_text())["token_counting"].values()) >= 24


def test_token_counts_match_the_chat_template(counter, smollm_tokenizer_dir):
    import pyarrow as pa

    from pipeline.data.pair_checks import TokenCounter

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "\n", "  ", "déjà", "vu", "42", "!", "x" * 30]
    prompts, chosen, rejected = [], [], []
    for i in range(40):
        turns = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
            if t < i % 3:
                turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=5))})
        prompts.append(turns)
        chosen.append([{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 80)))}])
        rejected.append([{"role": "assistant", "content": "no"}])
    exact = [max(len(counter.tok.apply_chat_template([*p, *c], tokenize=True)["input_ids"]),
                 len(counter.tok.apply_chat_template([*p, *r], tokenize=True)["input_ids"]))
             for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    got = counter.count_table(pa.array(prompts), pa.array(chosen), pa.array(rejected))
    for e, g in zip(exact, got, strict=True):
        # a pair is only ever reported as fitting when it does, and as too long when it is
        assert (g <= counter.max_length) == (e <= counter.max_length)
    fresh = TokenCounter(smollm_tokenizer_dir, 10_000)
    fresh._bytes = None  # no byte bound, and nothing near the limit: every count is an estimate
    est = fresh.count_table(pa.array(prompts), pa.array(chosen), pa.array(rejected))
    # contents counted one by one differ from the rendered whole only by merges at message boundaries
    # (two per message at most): well inside the band that sends a pair to the exact count
    slack = [2 * (len(p) + 1) for p in prompts]
    assert fresh.stats["exact"] == 0
    assert all(abs(int(a) - b) <= s for a, b, s in zip(est, exact, slack, strict=True))
    assert sum(int(a) == b for a, b in zip(est, exact, strict=True)) > len(exact) // 4


def test_pretoken_counts_equal_the_tokenizer(counter):
    from pipeline.data.pair_checks import PretokenCounter

    fast = PretokenCounter.for_tokenizer(counter.backend)
    assert fast is not None  # SmolLM2: byte-level BPE with the GPT-2 pre-tokenizer
    texts = ["Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n", "numbers 12345 and 3.14",
             "punctuation!!! ?? ... (ok)", "café naïve 東京 😀", "don't won't it's", "", " ", "a" * 300,
             "<|im_end|> is just text here"]
    assert fast.count(texts) == counter.lengths(texts)


# --- ingest -> validate -> build ---------------------------------------------------------------------

UF = {"instruction": "Name a colour of the sky.", "completions": [
    {"model": "a", "response": "Blue.", "annotations": {"helpfulness": {"Rating": "5"}, "honesty": {"Rating": "N/A"}},
     "finished": True},   # rate's flag: the generator ended it
    {"model": "b", "response": "Purple.", "annotations": {"helpfulness": {"Rating": "2"}, "honesty": {"Rating": "3"}},
     "finished": False},  # cut at max_new_tokens
    {"model": "c", "response": "Sky.", "annotations": {"helpfulness": {"Rating": "N/A"}}}]}


def _sources(tmp: Path) -> DataParams:
    mt = [json.loads(x) for x in shared_data("mt-bench", "mt_bench_question.jsonl").read_text().splitlines()]
    planted = [{"prompt": mt[0]["turns"][0], "chosen": "ok", "rejected": "no"},
               {"prompt": [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once."},
                           {"role": "user", "content": mt[5]["turns"][1]}], "chosen": [{"role": "assistant", "content": "A"}],
                "rejected": [{"role": "assistant", "content": "B"}]},
               {"prompt": "A question nobody evaluates on?", "chosen": "yes", "rejected": "no"}]
    (tmp / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted))
    tie = {**UF, "instruction": "A tie?", "completions": UF["completions"][:1] * 2}
    (tmp / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (UF, tie, UF)))
    (tmp / "eval.jsonl").write_text(json.dumps({"id": "e1", "prompt": "Explain why ice floats on water."}) + "\n")
    return DataParams.model_validate({
        "sources": [
            {"name": "hh", "format": "hh-rlhf", "path": str(shared_data("hh-rlhf", "harmless-base_test.jsonl.gz")),
             "license": "MIT", "max_rows": 60},
            {"name": "lf", "format": "sharegpt", "path": str(shared_data("llama-factory", "dpo_en_demo.json")),
             "license": "Apache-2.0", "max_rows": 40},
            {"name": "uf", "format": "ultrafeedback", "path": str(tmp / "uf.jsonl"), "license": "MIT"},
            {"name": "planted", "format": "pairs", "path": str(tmp / "planted.jsonl"), "license": "CC0-1.0"}],
        "decontaminate_against": [{"name": "mt-bench", "field": "turns",
                                   "path": str(shared_data("mt-bench", "mt_bench_question.jsonl"))}]})


def _pipeline(tmp: Path, tokenizer: Path, seed: int = 42, out: str = "dataset", **build_params) -> dict:
    data = _sources(tmp)
    for d in ("ingested", "validated", out, f"reports-{out}"):
        (tmp / d).mkdir(exist_ok=True)
    if not (tmp / "ingested" / "rows.jsonl").exists():
        ingest.run(data, PARAMS.paths, tmp / "ingested", tmp)
        validate.run(tmp / "ingested" / "rows.jsonl", data.sources, PARAMS.validate_.rows, 0.1, tmp / "validated",
                     tmp / "reports" / "validation")
    p = PARAMS.build.model_copy(update={"seed": seed, "test_fraction": 0.2, "batch_size": 16, **build_params})
    v = PARAMS.validate_.model_copy(update={"max_length": 1024, "max_quarantine_fraction": 0.5})
    sets = build.eval_sets_for(data, {"test_prompts": str(tmp / "eval.jsonl")})
    return build.run(tmp / "validated", data, p, v, sets, tokenizer, tmp / out, tmp / f"reports-{out}", tmp)


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("build")
    return tmp, _pipeline(tmp, smollm_tokenizer_dir)


def test_counts_account_for_every_row(built):
    tmp, m = built
    assert m["read"] == 60 + 40 + 3 + 3 and m["rows_unaccounted"] == 0
    assert m["filtered.exact_duplicate"] >= 1  # the repeated UltraFeedback row
    assert m["binarize.tie"] == 1 and m["filtered.no_pair"] == 1 and m["binarize.unrated"] >= 1
    assert m["pairs_built"] == m["pairs_train"] + m["pairs_test"] + m["pairs_quarantined"]
    assert m["pairs_test"] > 0 and m["prompts_train"] == m["pairs_train"]  # best_vs_worst: one pair a prompt
    filtered = [json.loads(x) for x in (tmp / "dataset" / "filtered.jsonl").read_text().splitlines()]
    by_reason = Counter(f["reason"].split(":")[0] for f in filtered)
    assert sum(by_reason.values()) == m["read"] - m["quarantined"] - m["groups_binarized"] + m["filtered.no_pair"]


def test_planted_mt_bench_questions_are_removed_and_reported(built):
    import pyarrow.parquet as pq

    tmp, m = built
    assert m["filtered.decontaminated.mt-bench"] == 2
    report = json.loads((tmp / "reports-dataset" / "decontamination.json").read_text())
    sets = report["sets"]
    assert sets["mt-bench"]["prompts"] == 80 and sets["test_prompts"]["removed"] == 0
    rows = {r["id"]: r for r in sets["mt-bench"]["rows"]}
    assert rows["planted:1"]["match"] == "exact" and rows["planted:1"]["eval_item"] == "81"
    assert rows["planted:2"]["eval_item"].endswith("#turn2") and rows["planted:2"]["source_row"].endswith(":2")
    prompts = [m_["content"] for t in ("train", "test")
               for p in pq.read_table(tmp / "dataset" / f"{t}.parquet").column("prompt").to_pylist() for m_ in p]
    assert "A question nobody evaluates on?" in prompts
    assert not any("travel blog post about a recent trip to Hawaii" in x for x in prompts)


def test_dataset_schema_and_provenance(built):
    import pyarrow.parquet as pq

    from pipeline.data.pair_checks import COLUMNS, SPLIT_COLUMNS

    tmp, m = built
    train = pq.read_table(tmp / "dataset" / "train.parquet")
    assert train.column_names == list(SPLIT_COLUMNS) and set(COLUMNS) < set(SPLIT_COLUMNS)
    # the generator's finished flag, carried rate -> ingest -> validate -> build; null where a source does not say
    pairs = [r for t in ("train", "test") for r in pq.read_table(tmp / "dataset" / f"{t}.parquet").to_pylist()]
    uf_pairs = [r for r in pairs if r["source"] == "uf"]
    assert uf_pairs and all((r["chosen_cut"], r["rejected_cut"]) == (False, True) for r in uf_pairs)
    assert all(r["chosen_cut"] is None and r["rejected_cut"] is None for r in pairs if r["source"] != "uf")
    assert sum(m[f"cut.rejected_{t}"] for t in ("train", "test")) == len(uf_pairs)
    assert sum(m[f"cut.unknown_{t}"] for t in ("train", "test")) == len(pairs) - len(uf_pairs)
    assert m["cut.chosen_train"] == m["cut.chosen_test"] == 0
    row = train.slice(0, 1).to_pylist()[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["score_chosen"] > row["score_rejected"] and row["rule"] == "best_vs_worst_length_matched"  # params.yaml build.binarize
    prov = pq.read_table(tmp / "dataset" / "provenance.parquet").to_pylist()
    uf = [p for p in prov if p["source"] == "uf"]
    assert uf and uf[0]["generator_chosen"] == "a" and uf[0]["license"] == "MIT"
    assert {"aspect": "honesty", "value": None} in uf[0]["ratings_chosen"]
    assert {p["seed"] for p in prov} == {42} and {p["split"] for p in prov} == {"train", "test"}
    assert not any(p["truncated"] for p in prov) and all(p["tokens_max"] > 0 for p in prov)  # quarantine mode
    test_hashes = set(pq.read_table(tmp / "dataset" / "test.parquet").column("prompt_hash").to_pylist())
    assert not test_hashes & set(train.column("prompt_hash").to_pylist())


def test_same_inputs_and_seed_give_identical_bytes(built, smollm_tokenizer_dir):
    tmp, first = built
    second = _pipeline(tmp, smollm_tokenizer_dir, out="again")
    assert second == first
    for name in ("train.parquet", "test.parquet", "provenance.parquet", "filtered.jsonl", "quarantine.jsonl"):
        assert (tmp / "again" / name).read_bytes() == (tmp / "dataset" / name).read_bytes(), name
    assert (tmp / "reports-again" / "decontamination.json").read_bytes() == \
        (tmp / "reports-dataset" / "decontamination.json").read_bytes()
    other = _pipeline(tmp, smollm_tokenizer_dir, seed=7, out="seed7")
    assert (tmp / "seed7" / "test.parquet").read_bytes() != (tmp / "dataset" / "test.parquet").read_bytes()
    assert other["pairs_train"] + other["pairs_test"] == first["pairs_train"] + first["pairs_test"]


def test_test_split_has_its_own_binarization(built, smollm_tokenizer_dir):
    """test_binarize applies to the test split's prompts only; the split itself does not move."""
    import pyarrow.parquet as pq

    tmp, first = built
    m = _pipeline(tmp, smollm_tokenizer_dir, out="alltest", binarize="best_vs_worst",
                  test_binarize="all_pairs_above_margin")
    rules = {split: set(pq.read_table(tmp / "alltest" / f"{split}.parquet").column("rule").to_pylist())
             for split in ("train", "test")}
    assert rules == {"train": {"best_vs_worst"}, "test": {"all_pairs_above_margin"}}
    hashes = {split: set(pq.read_table(tmp / d / f"{split}.parquet").column("prompt_hash").to_pylist())
              for d in ("alltest",) for split in ("train", "test")}
    assert hashes["test"] == set(pq.read_table(tmp / "dataset" / "test.parquet").column("prompt_hash").to_pylist())
    assert m["pairs_train"] == first["pairs_train"]


def test_all_pairs_per_row_method():
    """binarize_table takes one method per prompt group: all pairs for one, best vs worst for the other."""
    import pyarrow as pa

    from pipeline.data.binarization import binarize_table

    def comp(score):
        return {"ratings": [{"aspect": "overall", "value": score}]}
    groups = [[comp(5.0), comp(3.0), comp(1.0)], [comp(5.0), comp(3.0), comp(1.0)]]
    batch = pa.table({"completions": groups})
    rows, chosen, rejected, _, _ = binarize_table(batch, ["h0", "h1"], ["all_pairs_above_margin", "best_vs_worst"], 0.0, 0)
    assert rows == [0, 0, 0, 1] and list(zip(chosen, rejected, strict=True))[3] == (3, 5)


def test_source_weights_and_near_dup_off(built, smollm_tokenizer_dir):
    tmp, first = built
    data = _sources(tmp)
    data.sources[0].weight = 0.5  # hh: keep about half of its prompt groups, chosen by hash and seed
    p = PARAMS.build.model_copy(update={"near_dup_threshold": None, "test_fraction": 0.2, "batch_size": 16})
    v = PARAMS.validate_.model_copy(update={"max_length": 1024, "max_quarantine_fraction": 0.5})
    (tmp / "weighted").mkdir()
    m = build.run(tmp / "validated", data, p, v, build.eval_sets_for(data, {"test_prompts": str(tmp / "eval.jsonl")}),
                  smollm_tokenizer_dir, tmp / "weighted", tmp / "reports-weighted", tmp)
    assert 15 <= m["filtered.weight"] <= 45 and m["filtered.near_duplicate"] == 0 and m["rows_unaccounted"] == 0
    filtered = [json.loads(x) for x in (tmp / "weighted" / "filtered.jsonl").read_text().splitlines()]
    assert all(f["id"].startswith("hh:") for f in filtered if f["reason"] == "weight")


def test_token_length_truncate_keeps_long_pairs_flagged_and_counted(counter, tmp_path):
    """token_length: truncate keeps pairs over max_length (TRL truncates them at training), outside the
    quarantine budget, and names them; quarantine would have set the same pairs aside."""
    rows, Dataset = _pairs(8)
    for i in (2, 5):
        _break(rows, "token_length", i)
    rules = {r: "quarantine" for r in PairRules.model_fields}
    v = PARAMS.validate_.model_copy(update={"max_length": 128, "max_quarantine_fraction": 0.0,
                                            "pairs": PairRules(**{**rules, "token_length": "truncate"})})
    outcome, frame, _ = build.check_pairs(Dataset.from_list(rows), counter, v, tmp_path, "report.json", 4)
    assert outcome.error is None and outcome.quarantined == {} and outcome.truncated == [2, 5]
    assert json.loads((tmp_path / "report.json").read_text())["rules"]["token_length"] == {"action": "truncate",
                                                                                         "failed_rows": 2}
    q = PARAMS.validate_.model_copy(update={"max_length": 128, "max_quarantine_fraction": 1.0,
                                            "pairs": PairRules(**rules)})
    assert set(build.check_pairs(Dataset.from_list(rows), counter, q, None, "r", 4)[0].quarantined) == {2, 5}


def test_truncate_mode_keeps_long_pairs_and_records_them(built, smollm_tokenizer_dir):
    """The same validated rows at max_length 256 with token_length: truncate: the long hh-rlhf/LLaMA-Factory
    pairs are kept, flagged per pair in provenance and counted in the metrics."""
    import pyarrow.parquet as pq

    tmp, first = built
    data = _sources(tmp)
    p = PARAMS.build.model_copy(update={"seed": 42, "test_fraction": 0.2, "batch_size": 16})
    rules = PARAMS.validate_.pairs.model_copy(update={"token_length": "truncate"})
    v = PARAMS.validate_.model_copy(update={"max_length": 256, "max_quarantine_fraction": 0.5, "pairs": rules})
    for d in ("trunc", "reports-trunc"):
        (tmp / d).mkdir(exist_ok=True)
    m = build.run(tmp / "validated", data, p, v, build.eval_sets_for(data, {"test_prompts": str(tmp / "eval.jsonl")}),
                  smollm_tokenizer_dir, tmp / "trunc", tmp / "reports-trunc", tmp)
    prov = pq.read_table(tmp / "trunc" / "provenance.parquet").to_pylist()
    flagged = [r for r in prov if r["truncated"]]
    assert m["pairs_truncated"] == len(flagged) > 0 and all(r["tokens_max"] > 256 for r in flagged)
    quarantined = [json.loads(x) for x in (tmp / "trunc" / "quarantine.jsonl").read_text().splitlines()]
    assert not any("token_length" in q["rules"] for q in quarantined)  # no pair set aside for its length
    assert m["pairs_train"] + m["pairs_test"] >= first["pairs_train"] + first["pairs_test"]


def test_length_matched_rejects_the_lowest_scored_answer_closest_in_length():
    """Among completions sharing the lowest score, best_vs_worst takes the first; the length-matched rule
    takes the one whose length is nearest the chosen's, so the pair does not teach brevity."""
    from pipeline.data.binarization import pairs_for

    scores, lengths = [1.0, 5.0, 1.0, 1.0], [400, 90, 120, 30]
    assert pairs_for(scores, "best_vs_worst", 0.0, 0, "h", lengths)[0] == [(1, 0)]
    assert pairs_for(scores, "best_vs_worst_length_matched", 0.0, 0, "h", lengths)[0] == [(1, 2)]
    assert pairs_for([1.0, 1.0], "best_vs_worst_length_matched", 0.0, 0, "h", [5, 9])[0] == []  # a tie is no pair
    with pytest.raises(ValueError, match="lengths"):
        pairs_for(scores, "best_vs_worst_length_matched", 0.0, 0, "h")
