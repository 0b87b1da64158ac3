"""Every cache key and the resume fingerprint, tested by flipping one part at a time: the cache misses
(or the resume is refused, naming the part) exactly when a part changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.core import fingerprint as fpmod
from pipeline.eval import measures
from pipeline.eval.cache import EvalCache
from pipeline.eval.measures import Models, generations, kls, logps
from pipeline.train import trainer as tr

ROOT = Path(__file__).resolve().parents[1]


# -- reference log-probs -----------------------------------------------------------------------------------
class FakeCollectives:
    """Records every collective call; `main` plays rank 0, otherwise broadcast returns rank 0's object."""

    def __init__(self, main: bool = True, from_main: list | None = None):
        self.is_main_process = main
        self.calls: list[str] = []
        self.from_main = list(from_main or [])

    def broadcast(self, obj):
        self.calls.append("broadcast")
        return obj if self.is_main_process else self.from_main.pop(0)

    def barrier(self):
        self.calls.append("barrier")


def _dataset(ids=(1, 2, 3)):
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [list(ids), [4, 5]], "chosen_ids": [[6], [7, 8]], "rejected_ids": [[9], [10]]})


def _fake_trainer(**over):
    args = dict(max_length=512, truncation_mode="keep_start", precompute_ref_batch_size=8, padding_free=False,
                pad_to_multiple_of=None, bf16=False, fp16=False)
    dtype, device, attn = over.pop("dtype", torch.float32), over.pop("device", "cpu"), over.pop("attn", "sdpa")
    args.update({k: over.pop(k) for k in list(over) if k in args})
    model = torch.nn.Linear(1, 1).to(dtype)
    model.config = SimpleNamespace(_attn_implementation=attn)
    acc = SimpleNamespace(device=torch.device(device), unwrap_model=lambda m: m)
    self = SimpleNamespace(args=SimpleNamespace(**args), accelerator=acc, ref_model=None, model=model,
                           ld_alpha=over.pop("ld_alpha", None), _packing=over.pop("packing", True),
                           _ref_cache_key=over.pop("extra", {"model": "m" * 64, "chat_template": "t" * 64}))
    assert not over, over
    return self


def _ref_key(**over):
    data = over.pop("data", (1, 2, 3))
    return tr.OpenReleaseDPOTrainer.ref_cache_key(_fake_trainer(**over), _dataset(data), "train")


def _lookup(tmp: Path, key: dict) -> bool:
    """Run the cached path; True on a hit."""
    calls = []

    def compute():
        calls.append(1)
        return torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0])

    path = tmp / f"train-{tr.sha256_json(key)[:32]}.safetensors"
    tr.cached_reference(path, key, compute, FakeCollectives())
    return not calls


REF_FLIPS = {
    "data (token ids)": dict(data=(1, 2, 99)),
    "model weights": dict(extra={"model": "n" * 64, "chat_template": "t" * 64}),
    "chat template": dict(extra={"model": "m" * 64, "chat_template": "u" * 64}),
    "max_length": dict(max_length=256),
    "truncation_mode": dict(truncation_mode="keep_end"),
    "ld_alpha": dict(ld_alpha=0.5),
    "batch size": dict(precompute_ref_batch_size=4),
    "padding_free": dict(padding_free=True),
    "packing (padding-free micro-batches)": dict(packing=False),
    "precision": dict(bf16=True),
    "dtype": dict(dtype=torch.bfloat16),
    "device": dict(device="meta"),
    "attention implementation": dict(attn="eager"),
}


@pytest.mark.parametrize("part", sorted(REF_FLIPS))
def test_ref_logps_key_part_flip_misses(tmp_path, part):
    base = _ref_key()
    assert _lookup(tmp_path, base) is False and _lookup(tmp_path, base) is True  # stored, then a hit
    assert _lookup(tmp_path, _ref_key(**REF_FLIPS[part])) is False, part


@pytest.mark.parametrize("lib", ["torch", "transformers", "trl", "peft"])
def test_ref_logps_key_library_version_flip_misses(tmp_path, monkeypatch, lib):
    base = _ref_key()
    _lookup(tmp_path, base)
    real = fpmod.library_versions
    monkeypatch.setattr(fpmod, "library_versions", lambda *p: {**real(*p), lib: "0.0.0-other"})
    assert _lookup(tmp_path, _ref_key()) is False


def test_ref_logps_key_code_flip_misses(tmp_path, monkeypatch):
    base = _ref_key()
    _lookup(tmp_path, base)
    monkeypatch.setattr(fpmod, "code_part", lambda *m: "c" * 64)
    assert _lookup(tmp_path, _ref_key()) is False


def test_code_hash_follows_the_import_closure(tmp_path):
    """Editing a module the trainer imports (not the trainer itself) changes its code hash."""
    from pipeline.core.imports import code_sha256

    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    before = code_sha256("pipeline.train.trainer", root=tmp_path)
    lineage = tmp_path / "pipeline" / "core" / "lineage.py"
    lineage.write_text(lineage.read_text() + "\n# changed\n")
    assert code_sha256("pipeline.train.trainer", root=tmp_path) != before


def test_ref_cache_hit_compares_the_stored_key_not_the_row_count(tmp_path):
    key, other = _ref_key(), _ref_key(max_length=256)
    assert _lookup(tmp_path, other) is False
    # the other key's file under this key's name: same row count, different content key
    src = tmp_path / f"train-{tr.sha256_json(other)[:32]}.safetensors"
    shutil.copy(src, tmp_path / f"train-{tr.sha256_json(key)[:32]}.safetensors")
    assert tr.read_cached(tmp_path / f"train-{tr.sha256_json(key)[:32]}.safetensors", key) is None
    assert _lookup(tmp_path, key) is False


def test_multi_rank_hit_and_miss_run_the_same_collectives(tmp_path):
    key = _ref_key()
    path = tmp_path / "train-x.safetensors"
    values = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    miss = FakeCollectives()
    assert tr.cached_reference(path, key, lambda: values, miss)[2]["hit"] is False
    hit = FakeCollectives()
    assert tr.cached_reference(path, key, lambda: pytest.fail("recomputed"), hit)[2]["hit"] is True
    assert miss.calls == hit.calls == ["broadcast", "broadcast", "barrier"]
    # another rank without the file (another node): it follows rank 0's decision and values, same calls
    other = FakeCollectives(main=False, from_main=[True, values])
    c, r, event = tr.cached_reference(tmp_path / "absent.safetensors", key, lambda: pytest.fail("recomputed"), other)
    assert event["hit"] and torch.equal(c, values[0]) and other.calls == hit.calls


# -- evaluation cache ----------------------------------------------------------------------------------------
def _params():
    from pipeline.core.params import load_params

    return load_params(ROOT / "params.yaml")


def _eval_params():
    return _params().evaluate


def _model_dir(tmp: Path, name: str, dtype: str = "float32") -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"dtype": dtype}))
    return d


class Counting:
    def __init__(self):
        self.n = 0

    def generate(self, model, tok, convs, **kw):
        self.n += len(convs)
        return [["text"] for _ in convs]


class OtherBackend(Counting):
    def generate(self, model, tok, convs, **kw):
        return super().generate(model, tok, convs, **kw)


def _gen(tmp: Path, cache: EvalCache, *, models: Models | None = None, folder: Path | None = None,
         convs=None, p=None, fn: Counting | None = None) -> int:
    """Number of generations computed (0: every key hit)."""
    if models is None:
        models = Models(loader=lambda f: (None, None))
        models.known(_model_dir(tmp, "m"), "a" * 64)
    counter = fn or Counting()
    generations(models, folder or tmp / "m", convs or [[{"role": "user", "content": "hi"}]], p or _eval_params(),
                cache, counter.generate, "test")
    return counter.n


def test_eval_generation_key_parts_flip(tmp_path, monkeypatch):
    cache = EvalCache(tmp_path / "cache")
    assert _gen(tmp_path, cache) == 1 and _gen(tmp_path, cache) == 0
    changed = Models(loader=lambda f: (None, None))
    changed.known(_model_dir(tmp_path, "m2"), "b" * 64)
    assert _gen(tmp_path, cache, models=changed, folder=tmp_path / "m2") == 1, "model sha256"
    assert _gen(tmp_path, cache, convs=[[{"role": "user", "content": "bye"}]]) == 1, "prompt"
    p = _eval_params()
    p.generation.max_new_tokens += 1
    assert _gen(tmp_path, cache, p=p) == 1, "decoding"
    p = _eval_params()
    p.generation.precision = "bfloat16"
    assert _gen(tmp_path, cache, p=p) == 1, "decoding precision"
    for name, kw in (("device", {"device": "cuda"}), ("attention", {"attn_implementation": "eager"})):
        models = Models(loader=lambda f: (None, None), **kw)
        models.known(tmp_path / "m", "a" * 64)
        assert _gen(tmp_path, cache, models=models) == 1, name
    bf16 = Models(loader=lambda f: (None, None), dtype="bfloat16")
    bf16.known(tmp_path / "m", "a" * 64)
    assert _gen(tmp_path, cache, models=bf16) == 1, "dtype"
    assert _gen(tmp_path, cache, fn=OtherBackend()) == 1, "backend"
    assert _gen(tmp_path, cache) == 0  # nothing above overwrote the original entry
    real = fpmod.library_versions
    monkeypatch.setattr(fpmod, "library_versions", lambda *p: {**real(*p), "transformers": "0.0"})
    assert _gen(tmp_path, cache) == 1, "library version"
    monkeypatch.setattr(measures, "_CODE", {})
    monkeypatch.setattr(fpmod, "code_part", lambda *m: "c" * 64)
    assert _gen(tmp_path, cache) == 1, "code"


def test_eval_cache_hit_compares_the_stored_key(tmp_path):
    cache = EvalCache(tmp_path)
    cache.put("logp", {"a": 1}, [0.5, 3])
    src = cache._file("logp", {"a": 1})
    dst = cache._file("logp", {"a": 2})
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)  # right name, wrong content
    assert cache.get("logp", {"a": 2}) is None and cache.get("logp", {"a": 1}) == [0.5, 3]


def test_eval_logp_and_kl_keys_name_model_dtype_and_code(tmp_path, monkeypatch):
    import pipeline.lm.scoring as scoring

    calls = []
    monkeypatch.setattr(scoring, "tokenize_completion", lambda tok, pr, co, max_length=None: SimpleNamespace(n_completion=1))
    monkeypatch.setattr(scoring, "completion_logps", lambda m, items, **k: calls.append("logp") or [-1.0] * len(items))
    monkeypatch.setattr(scoring, "completion_kl", lambda a, b, items, **k: calls.append("kl") or [(0.1, 1)] * len(items))
    p = _eval_params()
    fake_tok = SimpleNamespace(pad_token_id=0)
    pair = [([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}])]

    def run(models, folder, cache, max_length=64):
        calls.clear()
        logps(models, folder, pair, p, max_length, cache, "t")
        kls(models, folder, folder, [pair[0][0]], ["a"], p, cache)
        return list(calls)

    cache = EvalCache(tmp_path / "c")
    models = Models(loader=lambda f: (None, fake_tok))
    models.known(_model_dir(tmp_path, "m"), "a" * 64)
    assert run(models, tmp_path / "m", cache) == ["logp", "kl"] and run(models, tmp_path / "m", cache) == []
    assert run(models, tmp_path / "m", cache, max_length=32) == ["logp"], "max_length (truncation)"
    other = Models(loader=lambda f: (None, fake_tok))
    other.known(tmp_path / "m", "b" * 64)
    assert run(other, tmp_path / "m", cache) == ["logp", "kl"], "model sha256"
    gpu = Models(loader=lambda f: (None, fake_tok), device="cuda")
    gpu.known(tmp_path / "m", "a" * 64)
    assert run(gpu, tmp_path / "m", cache) == ["logp", "kl"], "device"
    bf16 = Models(loader=lambda f: (None, fake_tok), dtype="bfloat16")
    bf16.known(tmp_path / "m", "a" * 64)
    assert run(bf16, tmp_path / "m", cache) == ["logp", "kl"], "dtype"
    monkeypatch.setattr(measures, "_CODE", {})
    monkeypatch.setattr(fpmod, "code_part", lambda *m: "c" * 64)
    assert run(models, tmp_path / "m", cache) == ["logp", "kl"], "code"


def test_loaded_model_that_does_not_match_its_key_is_an_error(tmp_path):
    folder = _model_dir(tmp_path, "m", dtype="bfloat16")
    models = Models(loader=lambda f: (torch.nn.Linear(1, 1).to(torch.bfloat16), None))  # keys name float32
    with pytest.raises(RuntimeError, match="cache keys name"):
        models.load(folder)


def test_local_judge_key_names_runtime_and_libraries(tmp_path, monkeypatch):
    from pipeline.core.params import LocalJudgeParams
    from pipeline.eval.judges import LocalJudge

    lp = LocalJudgeParams(model=None, batch_size=4, max_length=2048)
    folder = _model_dir(tmp_path, "m")
    cpu = LocalJudge(lp, folder, "a" * 64, Models().load).id
    assert cpu != LocalJudge(lp, folder, "a" * 64, Models(device="cuda").load).id
    real = fpmod.library_versions
    monkeypatch.setattr(fpmod, "library_versions", lambda *p: {**real(*p), "torch": "0.0"})
    assert cpu != LocalJudge(lp, folder, "a" * 64, Models().load).id


# -- resume fingerprint --------------------------------------------------------------------------------------
def _fp(p=None, model="m" * 64, data="d" * 64, template="t" * 64, root=ROOT, plan=None):
    from pipeline.stages.train import fingerprint
    p = p or _params().train
    fp = fingerprint(p, model, data, root=root, chat_template_sha256=template)
    return {**fp, "plan": plan or {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa"}}


def _with_checkpoint(folder: Path, fp: dict) -> None:
    from pipeline.train import checkpoints

    assert checkpoints.prepare_run(folder, fp).resume is None
    d = folder / "checkpoint-4"
    d.mkdir()
    for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / f).write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    assert checkpoints.prepare_run(folder, fp).resume == d  # same fingerprint: resumes


def _resume_flips():
    p_lr = _params().train
    p_lr.dpo["learning_rate"] = 1.0
    p_acc = _params().train
    p_acc.launcher.kind = "accelerate"
    return {
        "train.dpo.learning_rate": (dict(p=p_lr), "train.dpo.learning_rate"),
        "base model weights/tokenizer": (dict(model="n" * 64), "base_model"),
        "chat template": (dict(template="u" * 64), "chat_template"),
        "train data": (dict(data="e" * 64), "train_data"),
        "launcher config": (dict(p=p_acc), "launcher_config"),
        "device": (dict(plan={"device": "cuda", "precision": "fp32", "attn_implementation": "sdpa"}), "plan.device"),
        "precision": (dict(plan={"device": "cpu", "precision": "bf16", "attn_implementation": "sdpa"}), "plan.precision"),
        "attention": (dict(plan={"device": "cpu", "precision": "fp32", "attn_implementation": "eager"}),
                      "plan.attn_implementation"),
    }


@pytest.mark.parametrize("part", sorted(_resume_flips()))
def test_resume_refused_when_a_fingerprint_part_changes(tmp_path, part, caplog):
    from pipeline.train import checkpoints

    kwargs, named = _resume_flips()[part]
    _with_checkpoint(tmp_path, _fp())
    decision = checkpoints.prepare_run(tmp_path, _fp(**kwargs))
    assert decision.resume is None and not (tmp_path / "checkpoint-4").exists()
    assert named in decision.restart_reason and "starting over" in decision.restart_reason


@pytest.mark.parametrize("part", ["code", "torch", "transformers", "trl", "peft", "accelerate"])
def test_resume_refused_when_code_or_a_library_changes(tmp_path, monkeypatch, part):
    from pipeline.stages import train as train_stage
    from pipeline.train import checkpoints

    _with_checkpoint(tmp_path, _fp())
    if part == "code":
        monkeypatch.setattr(train_stage, "_code_hash", lambda: "c" * 64)
    else:
        real = fpmod.library_versions
        monkeypatch.setattr(fpmod, "library_versions", lambda *p: {**real(*p), part: "0.0"})
    decision = checkpoints.prepare_run(tmp_path, _fp())
    assert decision.resume is None and (part if part == "code" else f"versions.{part}") in decision.restart_reason


def test_launcher_config_content_is_in_the_fingerprint(tmp_path):
    p = _params().train
    p.launcher.kind = "accelerate"
    (tmp_path / "configs" / "accelerate").mkdir(parents=True)
    cfg = tmp_path / p.launcher.config
    cfg.write_text("num_processes: 1\n")
    before = _fp(p=p, root=tmp_path)["launcher_config"]
    cfg.write_text("num_processes: 2\n")
    assert before and _fp(p=p, root=tmp_path)["launcher_config"] != before


def test_run_loss_is_the_mean_over_every_logged_step():
    from pipeline.stages.train import run_loss

    history = [{"loss": 0.6, "step": 2}, {"loss": 0.4, "step": 4}, {"train_runtime": 1.0, "step": 4}]
    assert run_loss(history) == pytest.approx(0.5)
    assert run_loss([]) != run_loss([])  # NaN: no logged loss


def test_card_training_section_says_whether_the_run_resumed():
    from pipeline.release.cards import _resume_line

    yes = _resume_line({"resumed": 1.0, "resumed_from_step": 2, "steps": 4}, {})
    assert yes.startswith("resumed: yes, from the checkpoint at step 2 of 4")
    no = _resume_line({"resumed": 0.0, "steps": 4}, {"restart_reason": "checkpoints ... (plan.device: 'cpu' -> 'cuda')"})
    assert no.startswith("resumed: no (4 steps in one run; checkpoints") and "plan.device" in no
