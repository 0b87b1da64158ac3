"""What is published loads: the real `datasets` and `transformers` clients against the loopback Hub.

The clients run in a fresh process pointed at the server by HF_ENDPOINT (they read it at import), with
an empty HF_HOME, exactly as a user would call them. A card the Hub would refuse stops the publish
before any repo is created or committed to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.errors import GateError
from pipeline.core.params import load_params
from pipeline.release import hub
from pipeline.release.publish import dry_run
from tests.hub_server import HubServer
from tests.release_fixture import EVAL_PROMPTS, ROOT, VERSION, make_release_project
from tests.test_release_hub import DATASET, MODEL, TOKEN, _info, online  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    project = make_release_project(tmp_path_factory.mktemp("loads") / "proj", tiny_model_dir)
    return dry_run(load_params(project / "params.yaml"), project, project / "release")


@pytest.fixture
def server(online):  # noqa: F811
    with HubServer(TOKEN) as srv:
        yield srv


CLIENT = textwrap.dedent('''
    import json, sys
    import datasets
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_repo, dataset_repo, tag = sys.argv[1:4]
    out = {}
    d = datasets.load_dataset(dataset_repo, revision=tag)
    out["splits"] = {s: d[s].num_rows for s in d}
    out["columns"] = d["train"].column_names
    out["first_prompt"] = d["train"][0]["prompt"]
    out["configs"] = datasets.get_dataset_config_names(dataset_repo, revision=tag)
    prov = datasets.load_dataset(dataset_repo, "provenance", revision=tag)
    out["provenance"] = {s: prov[s].column_names for s in prov}
    ev = datasets.load_dataset(dataset_repo, "test_prompts", revision=tag)
    out["test_prompts"] = [r["prompt"] for r in ev["test"]]
    answers = datasets.load_dataset(dataset_repo, "eval_answers", split="test", revision=tag)
    out["eval_answers"] = sorted({(r["prompt_id"], r["model"]) for r in answers})
    out["config_rows"] = {c: {s: n for s, n in datasets.load_dataset(dataset_repo, c, revision=tag).num_rows.items()}
                          for c in out["configs"]}
    card = ModelCard.load(model_repo)
    out["model_index"] = sorted({(r.dataset_type, r.dataset_config, r.dataset_split, r.dataset_revision)
                                 for r in card.data.eval_results}, key=str)
    model = AutoModelForCausalLM.from_pretrained(model_repo, revision=tag)
    tok = AutoTokenizer.from_pretrained(model_repo, revision=tag)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    out["chat_template"] = tok.chat_template is not None
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    out["generated"] = gen.shape[-1] - ids.shape[-1]
    out["ids"] = gen[0, ids.shape[-1]:].tolist()
    print("RESULT " + json.dumps(out))
''')

# What a transformers 4.x user runs against the same Hub (tests/test_release_tf4.py's second virtualenv, which has
# no `datasets`): the model and tokenizer by repo id and tag, and the same greedy answer.
CLIENT_TF4 = textwrap.dedent('''
    import json, sys
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_repo, tag = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(model_repo, revision=tag)
    tok = AutoTokenizer.from_pretrained(model_repo, revision=tag)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    print("RESULT " + json.dumps({"transformers": transformers.__version__, "ids": gen[0, ids.shape[-1]:].tolist(),
                                  "prompt_ids": ids[0].tolist()}))
''')


def test_load_dataset_and_from_pretrained_against_the_loopback_hub(bundle, server, tmp_path):
    server.state.multipart_chunk = 4 * 1024 * 1024   # the 12.9 MB weights go up in parts, as big ones do
    hub.publish_bundle(bundle.path, _info(bundle, server), False, TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", CLIENT, MODEL, DATASET, VERSION], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["splits"] == {"train": 4, "test": 1}
    assert {"prompt", "chosen", "rejected", "chosen_cut", "rejected_cut"} <= set(out["columns"])
    assert out["first_prompt"][0]["role"] == "user"                         # TRL's conversational format
    assert set(out["configs"]) == {"default", "provenance", "test_prompts", "eval_answers"}
    assert out["eval_answers"] == [[f"e{i}", m] for i in range(len(EVAL_PROMPTS)) for m in ("base", "policy")]
    assert out["config_rows"]["eval_answers"] == {"test": 2 * len(EVAL_PROMPTS)}   # every config loads
    assert out["provenance"] == {"train": ["id", "source", "split", "seed"]}
    assert out["test_prompts"] == EVAL_PROMPTS
    assert (DATASET, "test_prompts", "test", VERSION) in [tuple(x) for x in out["model_index"]]
    assert all(x[0] == DATASET for x in out["model_index"])                # every result names this dataset
    assert out["chat_template"] and out["generated"] == 3
    puts = [p for m, p, _ in server.state.requests if m == "PUT"]
    assert sum("/part/" in p for p in puts) == 4                            # ceil(12.9 MB / 4 MiB) parts
    assert any(p.startswith("/lfs-complete/") for _, p, _ in server.state.requests)



def test_transformers_4x_loads_the_published_release_from_the_loopback_hub(bundle, server, tmp_path):
    """A transformers 4.x user (tests/test_release_tf4.py's second virtualenv, huggingface_hub 0.x) loads the
    published model and tokenizer by repo id and tag and gets the greedy answer transformers 5.x gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_release_tf4 import tf4_python

    python4 = tf4_python()   # skips cleanly without the virtualenv (fails under CI)
    hub.publish_bundle(bundle.path, _info(bundle, server), False, TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "PYTHONPATH"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf4"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([str(python4), "-c", CLIENT_TF4, MODEL, VERSION], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out4 = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    local = bundle.path / "model"   # the same files, under the pinned transformers 5.x
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = AutoModelForCausalLM.from_pretrained(local).generate(ids, max_new_tokens=3, do_sample=False)
    assert out4["transformers"].startswith("4.") and out4["prompt_ids"] == ids[0].tolist()
    assert out4["ids"] == gen[0, ids.shape[-1]:].tolist() and len(out4["ids"]) == 3


@pytest.mark.parametrize("repo, edit, reason", [
    ("model", lambda t: t.replace("license: apache-2.0", "license: apache-two"),
     '"license" must be one of the Hub license identifiers, got "apache-two"'),
    ("dataset", lambda t: t.replace("config_name: provenance", "config_name: default"),
     'config name "default" appears twice'),
    ("model", lambda t: t.replace("language:\n- en\n", "language:\n- English!\n", 1), '"language" must be language codes'),
    ("model", lambda t: t.replace("---\n", "---\nbroken: [unclosed\n", 1), "its YAML does not parse (while parsing a flow sequence"),
])
def test_a_card_the_hub_would_refuse_stops_the_publish_before_any_commit(bundle, server, tmp_path, repo, edit, reason):
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    readme = copy / repo / "README.md"
    text = readme.read_text()
    assert edit(text) != text
    readme.write_text(edit(text))
    with pytest.raises(GateError, match=f"{repo} card README.md fails the Hub's metadata validation") as e:
        hub.publish_bundle(copy, _info(bundle, server), False, TOKEN)
    assert reason in str(e.value)
    assert server.state.repos == {}                                         # nothing created, nothing committed
    assert not any(m in ("PUT",) or "/commit/" in p for m, p, _ in server.state.requests)


def test_the_loopback_hub_refuses_what_the_hub_refuses(server):
    """A file the Hub keeps in LFS sent inline, and an lfsFile naming an object never uploaded, are refused."""
    import base64
    import urllib.error
    import urllib.request

    hub.make_api(server.url, TOKEN).create_repo("o/r")

    def commit(entry) -> tuple[int, str]:
        body = "\n".join(json.dumps(x) for x in [{"key": "header", "value": {"summary": "x"}}, entry]).encode()
        req = urllib.request.Request(f"{server.url}/api/models/o/r/commit/main", data=body, method="POST", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    status, text = commit({"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64,
                                                       "size": 3}})
    assert status == 400 and "never uploaded" in text
    status, text = commit({"key": "file", "value": {"path": "w.safetensors", "encoding": "base64",
                                                    "content": base64.b64encode(b"abc").decode()}})
    assert status == 400 and "must be stored with Git LFS" in text
    assert len(server.repo("o/r").commits) == 1   # only the repo's initial commit
