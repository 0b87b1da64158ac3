"""Stage validate: every row rule through Great Expectations, quarantine vs fail, report and Data Docs.

GX takes seconds to import, so the quarantine-mode run over a fixture holding one breaking row per
rule is shared by the module; the fail-mode checks run without Data Docs.
"""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.core.errors import DataError
from pipeline.core.params import DataSource, RowRules
from pipeline.stages import validate

RULES = list(RowRules.model_fields)
SOURCES = [DataSource(name="s", format="pairs", path="unused", license="MIT")]


def good(i: int) -> dict:
    return {"id": f"s:{i}", "source": "s", "source_file": "src.jsonl", "source_line": i, "license": "MIT",
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "completions": [{"content": "yes", "generator": "g", "ratings": {"preference": 1.0}},
                            {"content": "no", "generator": "g", "ratings": {"preference": 0.0}}]}


def breaking(rule: str, i: int) -> list[dict]:
    """Rows (one, or two for unique_ids) that break exactly `rule`."""
    row = good(i)
    if rule == "required_fields":
        del row["license"]
    elif rule == "text_not_blank":
        row["completions"][1]["content"] = "   "
    elif rule == "roles_alternate":
        row["prompt"] = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    elif rule == "prompt_ends_with_user":
        row["prompt"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    elif rule == "ratings_in_range":
        row["completions"][0]["ratings"]["preference"] = 3.0
    elif rule == "no_control_chars":
        row["completions"][0]["content"] = "ye\x00s"  # a NUL byte from a broken export
    elif rule == "unique_ids":
        twin = copy.deepcopy(row)
        twin["source_line"] = i + 1000
        return [row, twin]
    return [row]


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory):
    """All rules in quarantine mode over 6 good rows and one breaking row (two for unique_ids) per rule."""
    tmp = tmp_path_factory.mktemp("validate")
    rows, expected = [good(i) for i in range(1, 7)], {}
    for n, rule in enumerate(RULES):
        for r in breaking(rule, 100 + n):
            expected[r["source_line"]] = rule
            rows.append(r)
    write_rows(tmp / "rows.jsonl", rows)
    out, report = tmp / "out", tmp / "report"
    out.mkdir()
    rules = RowRules(**{r: "quarantine" for r in RULES})
    summary = validate.run(tmp / "rows.jsonl", SOURCES, rules, 1.0, out, report)
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    return {"summary": summary, "quarantine": q, "expected": expected, "out": out, "report": report, "n": len(rows)}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_quarantines_exactly_its_rows(quarantined, rule):
    lines = {e["row"]["source_line"] for e in quarantined["quarantine"] if rule in e["rules"]}
    assert lines == {line for line, r in quarantined["expected"].items() if r == rule}
    for e in quarantined["quarantine"]:
        if rule in e["rules"]:
            assert e["rules"] == [rule] and e["reasons"][rule]  # one rule each, with its reason
            assert e["where"] == f"src.jsonl:{e['row']['source_line']}"


def test_every_row_is_accounted_for_and_kept_rows_are_parquet(quarantined):
    import pyarrow.parquet as pq

    s = quarantined["summary"]
    assert s["input_rows"] == quarantined["n"] == s["kept"] + s["quarantined"]
    assert s["quarantined"] == len(quarantined["expected"]) == len(quarantined["quarantine"])
    kept = pq.read_table(quarantined["out"] / "rows.parquet")
    assert kept.num_rows == s["kept"] == 6
    assert kept.column("id").to_pylist() == [f"s:{i}" for i in range(1, 7)]
    assert kept.slice(0, 1).to_pylist()[0]["completions"][0]["ratings"] == [{"aspect": "preference", "value": 1.0}]


def test_report_and_data_docs(quarantined):
    report = json.loads((quarantined["report"] / "report.json").read_text())
    assert report["status"] == "passed" and report["by_source"]["s"]["quarantined"] == len(quarantined["expected"])
    for rule in RULES:
        entry = report["rules"][rule]
        assert entry["action"] == "quarantine" and not entry["success"] and entry["expectations"]
        assert entry["examples"][0]["path"] == "src.jsonl"
    assert report["rules"]["ratings_in_range"]["expectations"][0]["kwargs"]["row_condition"]["pass_through_filter"] == 'source=="s"'
    index = (quarantined["report"] / "docs" / "index.html").read_text()
    assert "rows" in index and list((quarantined["report"] / "docs" / "validations").rglob("*.html"))


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_in_fail_mode_names_source_line_rule_and_excerpt(tmp_path, quarantined, rule):
    rows = [good(1), *breaking(rule, 7), good(2)]
    write_rows(tmp_path / "rows.jsonl", rows)
    rules = RowRules(**{r: ("fail" if r == rule else "quarantine") for r in RULES})
    with pytest.raises(DataError, match=rf"^src\.jsonl:7: \[s\] {rule}: .+: '.*' \(\d row\(s\) break this rule"):
        validate.run(tmp_path / "rows.jsonl", SOURCES, rules, 1.0, tmp_path, None)


def test_wrong_types_are_rule_failures_not_tracebacks(tmp_path, quarantined):
    row = good(3)
    row["completions"][0]["content"] = 42
    row["completions"][1]["ratings"] = {"preference": "high"}
    write_rows(tmp_path / "rows.jsonl", [good(1), row])
    rules = RowRules(**{r: "quarantine" for r in RULES})
    out = tmp_path / "out"
    out.mkdir()
    s = validate.run(tmp_path / "rows.jsonl", SOURCES, rules, 1.0, out, None)
    (entry,) = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert set(entry["rules"]) == {"text_not_blank", "ratings_in_range"} and s["kept"] == 1


def test_too_much_quarantine_fails(tmp_path, quarantined):
    write_rows(tmp_path / "rows.jsonl", [good(1), *breaking("text_not_blank", 2), *breaking("text_not_blank", 3)])
    rules = RowRules(**{r: "quarantine" for r in RULES})
    with pytest.raises(DataError, match=r"max_quarantine_fraction: 2 of 3 rows quarantined \(66\.7%\) > 50\.0%; "
                                        r"most by rule text_not_blank"):
        validate.run(tmp_path / "rows.jsonl", SOURCES, rules, 0.5, tmp_path, None)


def test_broken_line_in_ingested_rows_names_the_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps(good(1)) + "\n" + '{"id": "s:2", "prompt": [\n')
    rules = RowRules(**{r: "fail" for r in RULES})
    with pytest.raises(DataError, match=r"rows\.jsonl:2: valid JSON"):
        validate.run(tmp_path / "rows.jsonl", SOURCES, rules, 0.0, tmp_path, None)


def test_control_characters_other_than_tab_newline_and_crlf_are_quarantined(tmp_path):
    ok = good(1)
    ok["prompt"][0]["content"] = "Col\ta\r\nline two\n"
    bad = {2: "a\x1bb", 3: "a\rb", 4: "a\x7fb", 5: "tail\r"}
    rows = [ok]
    for line, text in bad.items():
        r = good(line)
        r["completions"][1]["content"] = text
        rows.append(r)
    write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    summary = validate.run(tmp_path / "rows.jsonl", SOURCES, RowRules(**{r: "quarantine" for r in RULES}), 1.0, out, None)
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert summary["kept"] == 1 and {e["row"]["source_line"] for e in q} == set(bad)
    assert all(e["rules"] == ["no_control_chars"] for e in q)
    assert "control character U+001B in completions[1].content at char 1" in json.dumps(q)
