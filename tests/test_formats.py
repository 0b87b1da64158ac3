"""Source readers: the real public files, in-memory fixtures for every layout, and their error messages."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.core.errors import DataError, SourceError
from pipeline.core.params import DataSource
from pipeline.data.formats import READERS, rating_range
from tests.conftest import shared_data


def src(fmt: str, name: str = "s", **kw) -> DataSource:
    return DataSource(name=name, format=fmt, path="unused", license="MIT", **kw)


def read(fmt: str, path, **kw) -> list[dict]:
    return list(READERS[fmt](str(path), src(fmt, **kw)))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


UF_ROW = {
    "source": "sharegpt", "instruction": "Plan a trip to Cairo.", "models": ["m-a", "m-b"],
    "correct_answers": ["None"],
    "completions": [
        {"model": "m-a", "principle": "helpfulness", "custom_system_prompt": "Be nice.", "response": "Visit the pyramids.",
         "annotations": {"instruction_following": {"Rating": "4", "Rationale": "ok"},
                         "honesty": {"Rating": "N/A", "Rationale": "n/a"},
                         "truthfulness": {"Type": ["1"], "Rationale": "x", "Rating": "3", "Rationale For Rating": "y"},
                         "helpfulness": [{"Rating": "2"}, {"Rating": "4"}]},
         "fine-grained_score": 3.0, "overall_score": 9.5, "critique": "fine"},
        {"response": "Stay home.", "annotations": {"helpfulness": {"Rating": 1}}},
    ],
}


def test_ultrafeedback_layout_with_extra_keys(tmp_path):
    rows = read("ultrafeedback", write_jsonl(tmp_path / "uf.jsonl", [UF_ROW]))
    (row,) = rows
    assert row["prompt"] == [{"role": "user", "content": "Plan a trip to Cairo."}]
    a, b = row["completions"]
    assert a["generator"] == "m-a" and a["content"] == "Visit the pyramids."
    # N/A is None; a list of annotations averages; overall_score is ignored.
    assert a["ratings"] == {"instruction_following": 4.0, "honesty": None, "truthfulness": 3.0, "helpfulness": 3.0}
    assert b["generator"] == "m-b" and b["ratings"] == {"helpfulness": 1.0}  # generator from `models`
    assert (row["id"], row["source_line"], row["license"]) == ("s:1", 1, "MIT")
    assert rating_range(src("ultrafeedback")) == (1.0, 5.0)


def test_ultrafeedback_carries_rates_finished_flag_and_refuses_a_bad_one(tmp_path):
    row = json.loads(json.dumps(UF_ROW))
    row["completions"][0]["finished"] = False   # rate: cut at max_new_tokens
    (got,) = read("ultrafeedback", write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert [c["finished"] for c in got["completions"]] == [False, None]   # absent: unknown, never guessed
    (pair,) = read("pairs", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}]))
    assert [c["finished"] for c in pair["completions"]] == [None, None]   # an external format never says
    row["completions"][1]["finished"] = "no"
    with pytest.raises(DataError, match=r"uf2\.jsonl:1: .*value type.*completions\[1\]\.finished must be true, false or null"):
        read("ultrafeedback", write_jsonl(tmp_path / "uf2.jsonl", [row]))


def test_ultrafeedback_id_and_bad_rating(tmp_path):
    rows = read("ultrafeedback", write_jsonl(tmp_path / "a.jsonl", [{**UF_ROW, "id": "p-7"}]))
    assert rows[0]["id"] == "s:p-7"
    bad = json.loads(json.dumps(UF_ROW))
    bad["completions"][0]["annotations"]["honesty"]["Rating"] = "great"
    with pytest.raises(DataError, match=r"b\.jsonl:2: \[s\] rating is a number or N/A: honesty: 'great'"):
        read("ultrafeedback", write_jsonl(tmp_path / "b.jsonl", [UF_ROW, bad]))
    with pytest.raises(DataError, match=r"c\.jsonl:1: \[s\] required key: missing key 'instruction'"):
        read("ultrafeedback", write_jsonl(tmp_path / "c.jsonl", [{"completions": []}]))


def test_hh_rlhf_real_file_multiturn_prompt_and_final_turns():
    path = shared_data("hh-rlhf", "harmless-base_test.jsonl.gz")
    rows = read("hh-rlhf", path)
    assert len(rows) == 2312
    for row in rows:
        roles = [m["role"] for m in row["prompt"]]
        assert roles[-1] == "user" and all(r in ("user", "assistant") for r in roles)
        assert [c["ratings"] for c in row["completions"]] == [{"preference": 1.0}, {"preference": 0.0}]
    assert sum(len(r["prompt"]) > 1 for r in rows) > 1000  # multi-turn kept as messages
    with gzip.open(path, "rt") as f:  # the prompt + final turns rebuild the original transcripts
        first = json.loads(f.readline())
    chosen = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                     for m in [*rows[0]["prompt"], {"role": "assistant", "content": rows[0]["completions"][0]["content"]}])
    assert " ".join(chosen.split()) == " ".join(first["chosen"].split())
    assert (rows[0]["source_line"], rows[-1]["source_line"]) == (1, 2312)


def test_hh_rlhf_merges_repeated_speaker_and_rejects_diverging_prompts(tmp_path):
    ok = {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nAssistant: b", "rejected": "\n\nHuman: hi\n\nAssistant: c"}
    (row,) = read("hh-rlhf", write_jsonl(tmp_path / "ok.jsonl", [ok]))
    assert row["prompt"] == [{"role": "user", "content": "hi"}]
    assert [c["content"] for c in row["completions"]] == ["a\n\nb", "c"]
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: x\n\nAssistant: b",
           "rejected": "\n\nHuman: hi\n\nAssistant: z\n\nHuman: x\n\nAssistant: c"}
    with pytest.raises(DataError, match=r"bad\.jsonl:1: \[s\] hh-rlhf shared prompt: .*at turn 2"):
        read("hh-rlhf", write_jsonl(tmp_path / "bad.jsonl", [bad]))
    with pytest.raises(DataError, match=r"hh-rlhf transcript: chosen must end with an Assistant turn"):
        read("hh-rlhf", write_jsonl(tmp_path / "c.jsonl", [{"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"}]))


def test_sharegpt_llama_factory_json_array():
    rows = read("sharegpt", shared_data("llama-factory", "dpo_en_demo.json"))
    assert len(rows) == 300
    assert rows[0]["source_line"] == 2 and rows[1]["source_line"] == 18  # the line each element starts on
    assert all(c["generator"] == "unknown" for r in rows for c in r["completions"])
    roles = {tuple(m["role"] for m in r["prompt"]) for r in rows}
    assert ("user",) in roles and ("system", "user") in roles
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)


def test_sharegpt_jsonl_system_column_and_errors(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "q"}], "system": "be terse",
           "chosen": {"from": "gpt", "value": "a"}, "rejected": [{"from": "gpt", "value": "b"}]}
    (row,) = read("sharegpt", write_jsonl(tmp_path / "s.jsonl", [rec]))
    assert row["prompt"] == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "q"}]
    bad = {**rec, "chosen": {"from": "human", "value": "a"}}
    with pytest.raises(DataError, match=r"one assistant completion: chosen must be one gpt/assistant message"):
        read("sharegpt", write_jsonl(tmp_path / "b.jsonl", [bad]))


@pytest.mark.parametrize("rec, prompt, chosen, rejected", [
    ({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."},
     [{"role": "user", "content": "Sky?"}], "Blue.", "Green."),
    ({"prompt": [{"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue."}],
      "rejected": [{"role": "assistant", "content": "Green."}]},
     [{"role": "user", "content": "Sky?"}], "Blue.", "Green."),
    ({"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
      "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]},
     [{"role": "user", "content": "Sky?"}], "Blue.", "Green."),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},  # trl.extract_prompt's string rule
     [{"role": "user", "content": "The sky is"}], " blue.", " green."),
], ids=["explicit-standard", "explicit-conversational", "implicit-conversational", "implicit-standard"])
def test_pairs_all_trl_variants(tmp_path, rec, prompt, chosen, rejected):
    (row,) = read("pairs", write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert row["prompt"] == prompt
    assert [c["content"] for c in row["completions"]] == [chosen, rejected]
    assert [c["ratings"] for c in row["completions"]] == [{"preference": 1.0}, {"preference": 0.0}]


def test_pairs_matches_trl_extract_prompt():
    from trl import extract_prompt

    from pipeline.data.formats.pairs import _char_prefix

    for a, b in [("The sky is blue.", "The sky is green."), ("abc", "abd"), ("same", "same"), ("x", "y")]:
        k = _char_prefix(a, b)
        assert extract_prompt({"chosen": a, "rejected": b}) == {"prompt": a[:k], "chosen": a[k:], "rejected": b[k:]}


def test_pairs_errors(tmp_path):
    two = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
           "rejected": "c"}
    with pytest.raises(DataError, match=r"p\.jsonl:1: \[s\] one assistant completion: chosen after the prompt"):
        read("pairs", write_jsonl(tmp_path / "p.jsonl", [two]))
    with pytest.raises(DataError, match=r"q\.jsonl:1: \[s\] value type: 'rejected' must be a string or a list"):
        read("pairs", write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "chosen": "a", "rejected": 3}]))


def test_rated_groups_by_prompt_and_reads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": "p1", "response": "r1", "helpfulness": 3, "correctness": 2, "coherence": 4, "complexity": 1,
             "verbosity": 0},
            {"prompt": "p2", "response": "r2", "helpfulness": 1, "correctness": 1, "coherence": 1, "complexity": 0,
             "verbosity": 4},
            {"prompt": "p1", "response": "r3", "helpfulness": 4, "correctness": None, "coherence": 4, "complexity": 2,
             "verbosity": 2}]
    path = tmp_path / "helpsteer.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    rows = read("rated", path)
    assert [r["prompt"][0]["content"] for r in rows] == ["p1", "p2"]
    assert [r["source_line"] for r in rows] == [0, 1]  # Parquet: row index of the group's first row
    assert [c["content"] for c in rows[0]["completions"]] == ["r1", "r3"]
    assert rows[0]["completions"][1]["ratings"] == {"helpfulness": 4.0, "correctness": None, "coherence": 4.0}
    only = read("rated", path, aspects=["verbosity"])
    assert only[1]["completions"][0]["ratings"] == {"verbosity": 4.0}
    assert rating_range(src("rated")) == (0.0, 4.0)
    with pytest.raises(DataError, match=r"missing rating column 'style'"):
        read("rated", path, aspects=["style"])


def test_file_layouts_and_broken_lines(tmp_path):
    rec = {"prompt": "q", "chosen": "a", "rejected": "b"}
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    assert [r["source_line"] for r in read("pairs", gz)] == [1, 3]  # blank lines keep the numbering
    as_jsonl = tmp_path / "p.json"
    as_jsonl.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    assert len(read("pairs", as_jsonl)) == 2  # a .json file may hold JSON lines
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n" + '{"prompt": "q", "chosen": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: valid JSON"):
        read("pairs", broken)
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q", "chosen": \n]')
    with pytest.raises(DataError, match=r"a\.json:4: valid JSON"):
        read("pairs", arr)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(json.dumps(rec).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:2: UTF-8 encoding"):
        read("pairs", latin)
    with pytest.raises(SourceError, match="unknown file type"):
        read("pairs", tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None


def test_hub_source_offline_is_a_clear_source_error(monkeypatch, tmp_path):
    """A Hub source is a pointer file (a local file DVC tracks) naming the dataset and its commit."""
    from pipeline.core.params import DataParams
    from pipeline.stages import ingest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pointer = tmp_path / "uf.hub.json"
    pointer.write_text(json.dumps({"dataset": "openbmb/UltraFeedback", "revision": "0" * 40}))
    data = DataParams.model_validate({"sources": [{"name": "uf", "format": "ultrafeedback", "path": str(pointer),
                                                   "license": "MIT"}]})
    with pytest.raises(SourceError, match=r"cannot load dataset openbmb/UltraFeedback@0{40} split train "
                                          r"\(HF_HUB_OFFLINE is set"):
        ingest.run(data, None, tmp_path / "out", tmp_path)
    pointer.write_text(json.dumps({"dataset": "openbmb/UltraFeedback", "revision": "main"}))
    with pytest.raises(DataError, match=r"uf\.hub\.json: Hub pointer"):
        ingest.run(data, None, tmp_path / "out", tmp_path)


def test_source_params_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DVC cannot depend on an hf:// URL.*pin a 40-hex commit"):
        DataSource(name="uf", format="ultrafeedback", path="hf://datasets/openbmb/UltraFeedback@main", license="MIT")
    with pytest.raises(ValidationError, match="min < max"):
        src("pairs", rating_range=(1, 1))
    with pytest.raises(ValidationError, match="applies to format `rated` only"):
        src("pairs", aspects=["x"])


@pytest.mark.parametrize("layout", ["jsonl", "json-array", "jsonl.gz", "json.gz"])
def test_bom_crlf_and_blank_last_line_read_as_the_same_rows(tmp_path, layout):
    recs = [{"prompt": "q1", "chosen": "a\nb", "rejected": "c"}, {"prompt": "q2", "chosen": "d", "rejected": "e"}]
    if layout.startswith("json-array") or layout == "json.gz":
        text = "[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n"
    else:
        text = "".join(json.dumps(r) + "\n" for r in recs)
    suffix = {"jsonl": ".jsonl", "json-array": ".json", "jsonl.gz": ".jsonl.gz", "json.gz": ".json.gz"}[layout]

    def write(name: str, data: str, bom: bool) -> str:
        raw = (b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8")
        path = tmp_path / (name + suffix)
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
        return path

    def rows(path) -> list:
        return [(r["prompt"], r["completions"], r["source_line"]) for r in read("pairs", path)]

    plain = rows(write("plain", text, bom=False))
    assert len(plain) == 2
    assert rows(write("bom", text, bom=True)) == plain
    assert rows(write("crlf", text.replace("\n", "\r\n"), bom=False)) == plain
    assert rows(write("all", text.replace("\n", "\r\n") + "\r\n", bom=True)) == plain  # + a blank last line


def test_bom_is_dropped_only_at_the_start(tmp_path):
    rec = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    mid = tmp_path / "m.jsonl"
    mid.write_bytes(rec.encode() + b"\n\xef\xbb\xbf" + rec.encode() + b"\n")
    with pytest.raises(DataError, match=r"m\.jsonl:2: valid JSON"):
        read("pairs", mid)
