"""The OpenAI-compatible judge against a real server: `transformers serve` on loopback.

The server (transformers 5's FastAPI app, served by uvicorn) loads local model folders offline and
applies each model's own chat template. Two tiny Llama models: the session's random one, whose
replies must equal a local greedy generation through the same chat template (so the request went
through the real HTTP path and template), and one built to answer "A" to everything, so a verdict
parses. `transformers serve` accepts `logprobs` but ignores it (it logs "Ignoring unsupported fields"
and sends none), so the judge reads the verdict from the reply text: the fallback a judge must have.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.core.params import OpenAIJudgeParams
from pipeline.eval.cache import EvalCache
from pipeline.eval.judges import OpenAIJudge, judge_pairs, load_template, parse_verdict

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "data" / "judge" / "pairwise.txt"
START_TIMEOUT_S = 180  # import + uvicorn start took 17 s with the 135M model at load 2 on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve` on 127.0.0.1 (no model pinned: each request names a local folder)."""
    pytest.importorskip("fastapi", reason="transformers serve needs fastapi (pip install transformers[serving])")
    pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn (pip install transformers[serving])")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TRANSFORMERS_VERBOSITY": "warning"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--log-level", "warning"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not up after {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def always_a_model(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A tiny Llama whose greedy next token is always "A": every layer's output projection is zero, so
    the last hidden state is the normed token embedding; dimension 0 of every embedding is 1 and the
    final norm keeps only it, so the untied LM head's only non-zero row (the token "A") always wins."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import write_template_lock

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    a = tok.encode("A", add_special_tokens=False)
    assert len(a) == 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[a[0], 0] = 10.0
    out = tmp_path_factory.mktemp("always-a")
    model.save_pretrained(out, safe_serialization=True)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    write_template_lock(out)
    return out


def _judge(url: str, model: Path, **kw) -> OpenAIJudge:
    p = {"base_url": f"{url}/v1", "model": str(model), "api_key_env": None, "max_retries": 0, "timeout_s": 120,
         "requests_per_minute": 100_000, "max_tokens": 1, "logprobs": True}
    return OpenAIJudge(OpenAIJudgeParams(**{**p, **kw}))


def _recording(judge: OpenAIJudge) -> list:
    """Keep each response the client gets (the judge itself keeps only the verdict)."""
    replies, create = [], judge.client.chat.completions.create

    def wrapped(**kwargs):
        resp = create(**kwargs)
        replies.append(resp)
        return resp

    judge.client.chat.completions.create = wrapped
    return replies


def test_judging_through_transformers_serve_uses_the_models_chat_template(served, tiny_model_dir, tmp_path):
    import torch

    from pipeline.lm.loading import load_causal_lm, load_tokenizer

    url, _ = served
    template = load_template(TEMPLATE)
    judge = _judge(url, tiny_model_dir, max_tokens=6)
    replies = _recording(judge)
    pairs = [("Name a colour.", "Blue.", "I like turtles."), ("Say hi.", "Hello!", "")]
    cache = EvalCache(tmp_path)
    outcome: dict = {}
    probs = judge_pairs(judge, template, pairs, cache, outcome=outcome)
    assert len(replies) == 2  # the pair with a blank answer is settled by rule, never sent
    assert probs[1] == (1.0, 1.0) and outcome["by_rule"] == [False, True]
    assert all(r.choices[0].logprobs is None for r in replies)  # the server sends no log-probs: text verdicts

    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = []
    for a, b in (("Blue.", "I like turtles."), ("I like turtles.", "Blue.")):
        ids = tok.apply_chat_template([{"role": "user", "content": template.fill("Name a colour.", a, b)}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [r.choices[0].message.content for r in replies] == texts  # same model, same chat template, greedy
    want = [parse_verdict(t.strip(), ("A", "B", None)) for t in texts]
    assert probs[0] == (0.5 if want[0] is None else want[0], 1 - (0.5 if want[1] is None else want[1]))
    assert outcome["unparsed"] == sum(w is None for w in want) == judge.unparsed
    assert {r.model for r in replies} == {str(tiny_model_dir)} and judge.snapshot == str(tiny_model_dir)

    again: dict = {}  # warm: one probe request, the rest from the cache, the same unparsed count
    assert judge_pairs(_judge(url, tiny_model_dir, max_tokens=6), template, pairs, cache, outcome=again) == probs
    assert again["unparsed"] == outcome["unparsed"]


def test_a_verdict_parsed_from_a_real_servers_reply(served, always_a_model, tmp_path):
    url, log = served
    judge = _judge(url, always_a_model)
    replies = _recording(judge)
    outcome: dict = {}
    probs = judge_pairs(judge, load_template(TEMPLATE), [("Pick one.", "yes", "no")], EvalCache(tmp_path),
                        outcome=outcome)
    assert [r.choices[0].message.content for r in replies] == ["A", "A"]
    # "A" in both orders: the first answer wins when shown first, the second when shown first
    assert probs == [(1.0, 0.0)] and outcome["unparsed"] == 0
    assert "Ignoring unsupported fields" in log.read_text() and "logprobs" in log.read_text()
