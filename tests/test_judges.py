"""Judges: the OpenAI-compatible judge against a loopback server, the local judge on the tiny model,
template handling, both-order judging with caching, and human-label agreement."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.core.errors import DataError, SourceError
from pipeline.core.params import JudgeParams, LocalJudgeParams, OpenAIJudgeParams
from pipeline.eval.cache import EvalCache
from pipeline.eval.judge_agreement import agreement, read_labeled_pairs
from pipeline.eval.judges import (
    JUDGES,
    LocalJudge,
    OpenAIJudge,
    RateLimiter,
    Template,
    judge_pairs,
    load_template,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "data" / "judge" / "pairwise.txt"


class FakeJudgeServer:
    """POST /v1/chat/completions on 127.0.0.1: prefers the answer containing GOOD.

    Knobs: `fail_first` (HTTP 500s before answering), `logprobs` (send top log-probs with P=0.8 for
    the verdict), `reply` (fixed reply text).
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_first = 0
        self.logprobs = False
        self.reply: str | None = None
        self.snapshot: str | None = None  # the `model` the server says answered (an alias's snapshot)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.fail_first > 0:
                    server.fail_first -= 1
                    return self._send(500, {"error": {"message": "temporarily broken"}}, {"retry-after-ms": "1"})
                text = body["messages"][-1]["content"]
                a = text.split("[Answer A]")[1].split("[Answer B]")[0]
                verdict = server.reply or ("A" if "GOOD" in a else "B")
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}
                if server.logprobs and body.get("logprobs"):
                    other = "B" if verdict == "A" else "A"
                    choice["logprobs"] = {"content": [{"token": verdict, "logprob": math.log(0.8), "bytes": None,
                                                       "top_logprobs": [
                                                           {"token": verdict, "logprob": math.log(0.8), "bytes": None},
                                                           {"token": " " + other, "logprob": math.log(0.2), "bytes": None}]}]}
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0,
                                 "model": server.snapshot or body["model"],
                                 "choices": [choice]})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _openai_params(url: str, **kw) -> OpenAIJudgeParams:
    base = {"base_url": url, "model": "fake-judge", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 2,
            "timeout_s": 5, "requests_per_minute": 60_000, "max_tokens": 1, "logprobs": False}
    return OpenAIJudgeParams(**{**base, **kw})


@pytest.fixture
def server():
    with FakeJudgeServer() as s:
        yield s


@pytest.fixture
def template() -> Template:
    return load_template(TEMPLATE)


def test_openai_judge_both_orders_and_key_from_env(server, template, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    judge = OpenAIJudge(_openai_params(server.url))
    pairs = [("Say hi", "GOOD hi", "meh"), ("Say bye", "meh", "GOOD bye")]
    probs = judge_pairs(judge, template, pairs, EvalCache(tmp_path))
    # (P(x better) shown first, P(x better) shown second): x is the first response of each pair
    assert probs == [(1.0, 1.0), (0.0, 0.0)]
    assert len(server.requests) == 4
    assert server.headers[0]["authorization"] == "Bearer sk-test-123"
    assert server.requests[0]["temperature"] == 0 and server.requests[0]["model"] == "fake-judge"
    # the key is in no request body and not in the judge id (which goes into cache keys)
    assert "sk-test-123" not in json.dumps(server.requests) and "sk-test-123" not in json.dumps(judge.id)


def test_openai_judge_is_cached_and_rejudges_on_template_change(server, template, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    cache = EvalCache(tmp_path)
    pairs = [("Q", "GOOD", "bad")]
    judge_pairs(OpenAIJudge(_openai_params(server.url)), template, pairs, cache)
    assert len(server.requests) == 2
    judge_pairs(OpenAIJudge(_openai_params(server.url)), template, pairs, cache)
    assert len(server.requests) == 3  # one request to see which snapshot answers; nothing else asked again
    changed = Template(text=template.text + "\nBe strict.", sha256="0" * 64, path="x")
    judge_pairs(OpenAIJudge(_openai_params(server.url)), changed, pairs, cache)
    assert len(server.requests) == 5
    judge_pairs(OpenAIJudge(_openai_params(server.url, model="other-judge")), template, pairs, cache)
    assert len(server.requests) == 7


def test_openai_judge_cache_is_keyed_by_the_snapshot_that_answered(server, template, tmp_path, monkeypatch):
    """Found by alias, verified by snapshot: the same alias answered by a new snapshot is a miss."""
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    cache = EvalCache(tmp_path)
    pairs = [("Q", "GOOD", "bad"), ("R", "bad", "GOOD")]
    server.snapshot = "fake-judge-2024-07-18"
    judge = OpenAIJudge(_openai_params(server.url))
    judge_pairs(judge, template, pairs, cache)
    assert len(server.requests) == 4 and judge.snapshot == "fake-judge-2024-07-18"
    stored = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert {e["value"]["snapshot"] for e in stored} == {"fake-judge-2024-07-18"}
    assert all(e["key"]["judge"]["model"] == "fake-judge" for e in stored)  # the alias finds the entry
    judge_pairs(OpenAIJudge(_openai_params(server.url)), template, pairs, cache)
    assert len(server.requests) == 5  # the probe only: same snapshot, every verdict reused
    server.snapshot = "fake-judge-2025-01-01"
    judge = OpenAIJudge(_openai_params(server.url))
    judge_pairs(judge, template, pairs, cache)
    assert len(server.requests) == 5 + 1 + 3  # probe, then the three verdicts of the old snapshot
    assert judge.snapshot == "fake-judge-2025-01-01"
    assert {json.loads(p.read_text())["value"]["snapshot"] for p in tmp_path.rglob("*.json")} == {"fake-judge-2025-01-01"}


def test_openai_judge_retries_transient_errors(server, template, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    server.fail_first = 2
    judge = OpenAIJudge(_openai_params(server.url, max_retries=2))
    assert judge.prob_a([template.fill("Q", "GOOD", "bad")]) == [1.0]
    assert len(server.requests) == 3


def test_openai_judge_gives_up_with_one_line_error(server, template, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    server.fail_first = 10
    judge = OpenAIJudge(_openai_params(server.url, max_retries=1))
    with pytest.raises(SourceError, match="answered 500 after 1 retries"):
        judge.prob_a([template.fill("Q", "a", "b")])


def test_openai_judge_unreachable_and_missing_key(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(SourceError, match="environment variable TEST_JUDGE_KEY is not set"):
        OpenAIJudge(_openai_params("http://127.0.0.1:9/v1"))
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    judge = OpenAIJudge(_openai_params("http://127.0.0.1:9/v1", max_retries=0, timeout_s=2))
    with pytest.raises(SourceError, match="cannot be reached"):
        judge.prob_a(["x"])


def test_openai_judge_logprobs_and_unparsed_reply(server, template, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    server.logprobs = True
    judge = OpenAIJudge(_openai_params(server.url, logprobs=True))
    p = judge.prob_a([template.fill("Q", "GOOD", "bad"), template.fill("Q", "bad", "GOOD")])
    assert p == [pytest.approx(0.8), pytest.approx(0.2)]
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 5
    server.logprobs, server.reply = False, "I cannot decide."
    judge = OpenAIJudge(_openai_params(server.url))
    assert judge.prob_a([template.fill("Q", "x", "y")]) == [0.5]
    assert judge.unparsed == 1


def test_openai_judge_without_auth(server, template):
    judge = OpenAIJudge(_openai_params(server.url, api_key_env=None))
    assert judge.prob_a([template.fill("Q", "GOOD", "x")]) == [1.0]


def test_rate_limiter_spaces_requests():
    now, slept = [100.0], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one request per 0.5 s
    for _ in range(3):
        rl.wait()
    assert slept == [pytest.approx(0.5), pytest.approx(0.5)]


def test_template_rules(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("Compare {response_a} and {response_b}.")
    with pytest.raises(DataError, match=r"\{instruction\} must appear exactly once, found 0"):
        load_template(bad)
    with pytest.raises(DataError, match="no such file"):
        load_template(tmp_path / "missing.txt")
    t = load_template(TEMPLATE)
    filled = t.fill("use {braces}", "A says {response_b}", "B")
    assert "use {braces}" in filled and "A says {response_b}" in filled  # no double substitution
    assert len(t.sha256) == 64


def _local_params(**kw) -> LocalJudgeParams:
    return LocalJudgeParams(**{"model": None, "batch_size": 3, "max_length": 2048, **kw})


def test_local_judge_on_tiny_model_matches_a_manual_forward_pass(tiny_model_dir, template):
    import torch

    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    loaded = []

    def loader(d):
        loaded.append(d)
        return load_causal_lm(d), load_tokenizer(d)

    jp = JudgeParams(kind="local", local=_local_params(), lc_c=1.0)
    judge = JUDGES["local"](jp, default_model=tiny_model_dir, sha256_of=lambda d: "f" * 64, loader=loader)
    assert loaded == []  # nothing is loaded until a judgment is needed
    prompts = [template.fill(f"Question {i}", "short" * i, "a longer answer " * (5 - i)) for i in range(5)]
    batched = judge.prob_a(prompts)
    assert len(loaded) == 1 and all(0 < p < 1 for p in batched)
    one_by_one = LocalJudge(_local_params(batch_size=1), tiny_model_dir, "f" * 64, loader).prob_a(prompts)
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # right padding does not change the answer

    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=True, return_dict=True,
                                  add_generation_prompt=True)["input_ids"]
    with torch.inference_mode():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    a = sum(probs[tok.encode(s, add_special_tokens=False)[0]] for s in ("A", " A"))
    b = sum(probs[tok.encode(s, add_special_tokens=False)[0]] for s in ("B", " B"))
    assert batched[0] == pytest.approx(float(a / (a + b)), abs=1e-5)


def test_local_judge_missing_folder(tmp_path):
    jp = JudgeParams(kind="local", local=_local_params(model=str(tmp_path / "nope")), lc_c=1.0)
    with pytest.raises(SourceError, match="folder .* does not exist"):
        JUDGES["local"](jp, default_model=tmp_path, sha256_of=lambda d: "0", loader=None)


def test_judge_params_need_the_chosen_block():
    with pytest.raises(ValueError, match="kind is 'openai' but the `openai` block is missing"):
        JudgeParams(kind="openai", local=_local_params(), lc_c=1.0)


class ScriptedJudge:
    """Prefers the response containing GOOD; counts calls."""

    id = {"kind": "scripted"}
    unparsed = 0

    def __init__(self):
        self.calls = 0

    def prob_a(self, prompts):
        self.calls += len(prompts)
        return [1.0 if "GOOD" in p.split("[Answer A]")[1].split("[Answer B]")[0] else 0.0 for p in prompts]


def test_read_labeled_pairs_both_shapes_and_errors(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [
        {"instruction": "Q1", "response_a": "GOOD", "response_b": "x", "label": "A"},
        {"conversation_a": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "x"}],
         "conversation_b": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "GOOD"}],
         "winner": "model_b", "judge": "expert_1"},
        {"prompt": "Q3", "response_a": "x", "response_b": "y", "label": "tie"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_labeled_pairs(f)
    assert [r["label"] for r in got] == ["A", "B", "tie"]
    assert got[1] == {"instruction": "Q2", "response_a": "x", "response_b": "GOOD", "label": "B", "line": 2}
    f.write_text(json.dumps({**rows[0], "label": "C"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: label: must be 'A', 'B' or 'tie'"):
        read_labeled_pairs(f)
    f.write_text(json.dumps({**rows[1], "winner": "model_c"}) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:1: winner"):
        read_labeled_pairs(f)
    f.write_text(json.dumps({**rows[0], "response_b": None}) + "\n")  # blank is allowed (judged); None is not
    with pytest.raises(DataError, match="pairs.jsonl:1: response_b: must be a string"):
        read_labeled_pairs(f)


def test_agreement_against_human_labels(tmp_path, template):
    rows = [{"instruction": f"Q{i}", "response_a": a, "response_b": b, "label": lab}
            for i, (a, b, lab) in enumerate([("GOOD", "x", "A"), ("x", "GOOD", "B"), ("GOOD", "x", "B"),
                                             ("x", "GOOD", "B"), ("x", "y", "tie")])]
    judge = ScriptedJudge()
    s = agreement(judge, template, rows, EvalCache(tmp_path))
    # verdicts A, B, A, B, tie: with no GOOD in the last pair the judge picks whichever answer is
    # shown second, so the two orders disagree and the pair is a tie (which matches the label)
    assert s["n"] == 5 and s["agreement"] == pytest.approx(4 / 5)
    assert s["n_no_tie"] == 4 and s["agreement_no_tie"] == pytest.approx(3 / 4)
    assert judge.calls == 10


def test_judge_agreement_cli(tmp_path, tiny_model_dir, capsys):
    import yaml

    from pipeline.eval.judge_agreement import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(base_model=str(tiny_model_dir), judge_template=str(TEMPLATE),
                           eval_cache=str(tmp_path / "cache"), judge_labels="pairs.jsonl", reports="reports")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": f"Q{i}", "response_a": "yes", "response_b": "no",
                                         "label": "AB"[i % 2]}) + "\n" for i in range(4)))
    assert main([str(pairs), "--params", str(tmp_path / "params.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and out["judge"]["kind"] == "local" and 0 <= out["agreement"] <= 1
    assert out["kappa_ci_low"] is None  # 4 pairs < evaluate.bootstrap.min_clusters: no interval, null in JSON
    from pipeline.core.params import load_params
    from pipeline.eval.measures import Models

    m = Models()  # the judge the evaluate stage builds: same id, so its report matches and its cache is shared
    stage_judge = JUDGES["local"](load_params(tmp_path / "params.yaml").evaluate.judge, default_model=tiny_model_dir,
                                  sha256_of=m.sha256, loader=m.load)
    assert out["judge"] == stage_judge.id
    assert any((tmp_path / "cache" / "judgment").rglob("*.json"))
    written = list((tmp_path / "reports" / "judge_agreement").glob("pairs-*.json"))  # what the card reads
    report = json.loads(written[0].read_text())
    assert len(written) == 1 and report == out and len(report["file_sha256"]) == 64
    assert report["template_sha256"] == load_template(TEMPLATE).sha256
    assert main([str(tmp_path / "missing.jsonl"), "--params", str(tmp_path / "params.yaml")]) == 1
    assert "missing.jsonl: file exists: no such file" in capsys.readouterr().err


def test_mt_bench_verdicts_are_parsed_as_fastchat_does():
    from pipeline.eval.judges import parse_verdict

    mt = ("[[A]]", "[[B]]", "[[C]]")
    assert parse_verdict("Assistant A is more helpful. [[A]]", mt) == 1.0
    assert parse_verdict("Final verdict: [[B]]", mt) == 0.0
    assert parse_verdict("Both are equally good. [[C]]", mt) == 0.5
    assert parse_verdict("A is better", mt) is None  # no verdict token: unparsed
    assert parse_verdict("B. Because A rambles.", ("A", "B", None)) == 0.0  # letters: first whole word


def test_mt_bench_pair_v2_template_runs_on_a_local_judge(tiny_model_dir, tmp_path):
    from pipeline.core.params import JudgeParams
    from pipeline.eval.judges import template_for
    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    jp = JudgeParams(kind="local", local=_local_params(), lc_c=1.0,
                     verdicts={"a": "[[A]]", "b": "[[B]]", "tie": "[[C]]"},
                     placeholders={"instruction": "{question}", "response_a": "{answer_a}", "response_b": "{answer_b}"})
    t = template_for(ROOT / "data" / "judge" / "mt_bench_pair_v2.json", jp)
    assert t.system and "[[C]]" in t.system and "{question}" not in t.fill("Q?", "a", "b")
    judge = JUDGES["local"](jp, default_model=tiny_model_dir, sha256_of=lambda d: "f" * 64,
                            loader=lambda d: (load_causal_lm(d), load_tokenizer(d)))
    got = judge_pairs(judge, t, [("Q?", "yes", "no"), ("Q2?", "", "something")], EvalCache(tmp_path))
    assert all(0 <= p <= 1 for pair in got for p in pair)
    assert got[1] == (0.0, 0.0)  # the blank answer loses in both orders, without the judge
    assert judge.id["verdicts"] == ["[[A]]", "[[B]]", "[[C]]"]


def test_judge_agreement_settles_blank_answers_by_rule(tmp_path, template):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"instruction": "Q", "response_a": "", "response_b": "GOOD", "label": "B"}) + "\n"
                 + json.dumps({"instruction": "Q2", "response_a": "GOOD", "response_b": "x", "label": "A"}) + "\n")
    rows = read_labeled_pairs(f)  # no input error for the blank answer
    judge = ScriptedJudge()
    s = agreement(judge, template, rows, EvalCache(tmp_path / "c"))
    assert s["agreement"] == 1.0 and s["n"] == 1 and s["n_rule"] == 1 and s["rule_agreement"] == 1.0
    assert judge.calls == 2  # only the pair with two answers was sent to the judge
    f.write_text(json.dumps({"instruction": " ", "response_a": "a", "response_b": "b", "label": "A"}) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:1: instruction: must be a non-blank string"):
        read_labeled_pairs(f)
