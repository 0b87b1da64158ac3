"""The train stage: DPOConfig from params, checks, checkpoints, sampler, LM-head patch, and real (tiny)
training runs: determinism, cache reuse, resume after SIGKILL, and two DDP processes under accelerate."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.errors import DataError, ParamsError
from pipeline.lineage import sha256_file
from pipeline.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red blue green one two three cat dog sun moon tree rock".split()


def write_pairs(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """train.parquet/test.parquet in the built-dataset schema, with short texts (tiny-model speed)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"List {rng.randint(2, 5)} words: {words(rng.randint(1, 4))}"}]
        rows.append({"id": f"t{i}", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": words(rng.randint(2, 8))}],
                     "rejected": [{"role": "assistant", "content": words(rng.randint(2, 8))}],
                     "score_chosen": 1.0, "score_rejected": 0.0, "source": "test", "source_row": f"t.jsonl:{i + 1}",
                     "rule": "pass-vs-fail", "prompt_hash": f"{i:064x}"})
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "test.parquet")
    return folder


def tiny_params(**train_overrides):
    """The real params.yaml with the train section shrunk for the tiny model."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    t = raw["train"]
    t["dpo"].update(max_steps=4, num_train_epochs=2, precompute_ref_batch_size=4, warmup_steps=0, max_length=128)
    t.update(per_device_batch_size=2, global_batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    for k, v in train_overrides.items():
        t[k] = v
    return parse_params(raw)


# -- configuration ---------------------------------------------------------------------------------------
def test_dpo_config_builds_from_real_params(tmp_path):
    """A TRL upgrade that renames or drops a field used in params.yaml fails here, not on release day."""
    from trl import DPOConfig

    from pipeline.dpo_setup import build_dpo_config, make_plan

    p = load_params(ROOT / "params.yaml").train
    plan = make_plan(p, ROOT, world_size=1)
    cfg = build_dpo_config(p, plan, tmp_path)
    assert isinstance(cfg, DPOConfig)
    for key, value in p.dpo.items():
        got = getattr(cfg, key)
        assert (got.value if hasattr(got, "value") else got) == value, key
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size == p.global_batch_size
    assert (cfg.save_steps, cfg.save_total_limit, cfg.report_to) == (p.checkpoint_every, p.keep_checkpoints, [])
    assert cfg.bf16 is False and cfg.use_cpu is True and cfg.gradient_checkpointing is False  # CPU: fp32, no GC


@pytest.mark.parametrize("dpo, match", [
    ({"betta": 0.1}, r"train\.dpo\.betta: not a field of trl\.DPOConfig; did you mean beta"),
    ({"beta": "high"}, r"train\.dpo\.beta = 'high': wrong type"),
    ({"num_train_epochs": [3]}, r"train\.dpo\.num_train_epochs"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"train\.dpo is rejected by trl\.DPOConfig: `loss_weights`"),
])
def test_bad_dpo_fields_are_params_errors(tmp_path, dpo, match):
    from pipeline.dpo_setup import build_dpo_config, make_plan

    p = load_params(ROOT / "params.yaml").train
    p.dpo = dpo
    with pytest.raises(ParamsError, match=match):
        build_dpo_config(p, make_plan(p, ROOT, world_size=1), tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["dpo"].update(per_device_train_batch_size=2), r"train\.dpo.*set by the stage; use train\.per_device_batch_size"),
    (lambda t: t["dpo"].update(output_dir="x"), r"use paths\.checkpoints"),
    (lambda t: t["launcher"].update(kind="accelerate", config=None), r"train\.launcher.*config"),
    (lambda t: t["launcher"].update(num_processes=2), r"kind 'python' runs one process"),
    (lambda t: t["lora"].update(r=0), r"train\.lora\.r = 0"),
    (lambda t: t.update(global_batch_size=0), r"train\.global_batch_size = 0"),
])
def test_train_params_validation(edit, match):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw["train"])
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)


def test_global_batch_is_kept_when_devices_change():
    from pipeline.dpo_setup import derive_accumulation

    assert [derive_accumulation(8, 4, n) for n in (1, 2)] == [2, 1]
    assert derive_accumulation(32, 2, 4) == 4
    with pytest.raises(ParamsError, match=r"global_batch_size = 8 is not a multiple .* 3 x 1"):
        derive_accumulation(8, 3, 1)


def _plan(**kw):
    from pipeline.dpo_setup import Plan

    base = dict(device="cuda", world_size=1, local_processes=1, per_device_batch_size=4, grad_accumulation=2,
                global_batch_size=8, torch_threads=None, attn_implementation="sdpa", precision="bf16",
                gradient_checkpointing=False, liger=False, distributed_type="NO")
    return Plan(**{**base, **kw})


def test_incompatible_combinations_are_refused():
    from pipeline.dpo_setup import check_compatible

    p = load_params(ROOT / "params.yaml").train
    assert p.dpo["precompute_ref_log_probs"] is True
    with pytest.raises(ParamsError, match=r"train\.liger = true cannot be combined with .*precompute_ref_log_probs"):
        check_compatible(p, _plan(liger=True))
    with pytest.raises(ParamsError, match=r"precompute_ref_log_probs = true is not supported under FSDP2"):
        check_compatible(p, _plan(distributed_type="FSDP", fsdp_version=2))
    check_compatible(p, _plan(distributed_type="FSDP", fsdp_version=1))  # FSDP1 is fine
    p.dpo = {**p.dpo, "precompute_ref_log_probs": False}
    check_compatible(p, _plan(liger=True, distributed_type="FSDP", fsdp_version=2))


def test_cpu_plan_and_accelerate_configs():
    from pipeline.dpo_setup import make_plan, read_accelerate_config

    p = load_params(ROOT / "params.yaml").train
    plan = make_plan(p, ROOT, world_size=1)
    assert (plan.device, plan.precision, plan.gradient_checkpointing, plan.attn_implementation) == ("cpu", "fp32", False, "sdpa")
    assert plan.torch_threads == len(os.sched_getaffinity(0))
    for name in ("single_gpu", "ddp", "fsdp", "deepspeed_zero3", "multi_node"):
        cfg = read_accelerate_config(ROOT / "configs" / "accelerate" / f"{name}.yaml")
        assert cfg["mixed_precision"] == "no", name  # precision is the stage's decision, not the launcher's
    p.launcher = p.launcher.model_validate({"kind": "accelerate", "config": "configs/accelerate/fsdp.yaml", "num_processes": 2})
    with pytest.raises(ParamsError, match="FSDP needs GPUs"):
        make_plan(p, ROOT)
    p.launcher = p.launcher.model_validate({"kind": "accelerate", "config": "configs/accelerate/nope.yaml"})
    with pytest.raises(ParamsError, match="no such file"):
        make_plan(p, ROOT)


# -- data ------------------------------------------------------------------------------------------------
def test_load_pairs_rules(tmp_path):
    from pipeline.stages.train import load_pairs

    good = write_pairs(tmp_path / "ok", n=3) / "train.parquet"
    assert len(load_pairs(good)) == 3
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.parquet")
    table = pq.read_table(good)
    pq.write_table(table.drop_columns(["rejected"]), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"missing \['rejected'\]"):
        load_pairs(tmp_path / "nocol.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="the split is empty"):
        load_pairs(tmp_path / "empty.parquet")
    rows = table.to_pylist()
    rows[1]["chosen"] = [{"role": "user", "content": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "role.parquet")
    with pytest.raises(DataError, match=r"row 1: chosen is one non-empty assistant message"):
        load_pairs(tmp_path / "role.parquet")
    rows = table.to_pylist()
    rows[2]["prompt"] = [{"role": "assistant", "content": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompt.parquet")
    with pytest.raises(DataError, match=r"row 2: prompt ends with a user turn"):
        load_pairs(tmp_path / "prompt.parquet")


# -- checkpoints -----------------------------------------------------------------------------------------
def _fake_checkpoint(folder: Path, step: int, *, state=True, weights=True, truncated=False) -> Path:
    d = folder / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / f).write_bytes(b"x")
    if weights:
        (d / "adapter_model.safetensors").write_bytes(b"x")
    if state:
        text = json.dumps({"global_step": step})
        (d / "trainer_state.json").write_text(text[:5] if truncated else text)
    return d


def test_checkpoints_resume_only_from_complete_ones(tmp_path):
    from pipeline import checkpoints

    fp = {"run": 1}
    assert checkpoints.prepare(tmp_path, fp) is None  # first run: nothing to resume, RUN.json written
    c2 = _fake_checkpoint(tmp_path, 2)
    c4 = _fake_checkpoint(tmp_path, 4)
    partial = [_fake_checkpoint(tmp_path, 6, state=False), _fake_checkpoint(tmp_path, 8, truncated=True),
               _fake_checkpoint(tmp_path, 10, weights=False)]
    assert [checkpoints.is_complete(c) for c in (c2, c4, *partial)] == [True, True, False, False, False]
    assert checkpoints.prepare(tmp_path, fp) == c4
    assert not any(p.exists() for p in partial)  # partial folders are removed, not resumed
    checkpoints.prune(tmp_path, c4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RUN.json", "checkpoint-4"]
    assert checkpoints.prepare(tmp_path, {"run": 2}) is None  # other inputs/params: never resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RUN.json"]


# -- sampler and LM head ---------------------------------------------------------------------------------
def test_length_grouped_sampler_is_seeded_per_epoch_and_groups_lengths():
    from pipeline.dpo_trainer import LengthGroupedEpochSampler

    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(96)]
    s = LengthGroupedEpochSampler(lengths, group_size=8, seed=42)
    first = list(s)
    assert sorted(first) == list(range(96))
    assert list(LengthGroupedEpochSampler(lengths, group_size=8, seed=42)) == first  # same seed, same order
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first  # resuming at epoch 0 sees epoch 0's order again

    def padding(order):
        return sum(max(lengths[i] for i in order[k:k + 4]) * 4 - sum(lengths[i] for i in order[k:k + 4])
                   for k in range(0, len(order), 4))

    shuffled = list(range(96))
    random.Random(0).shuffle(shuffled)
    assert padding(first) < 0.5 * padding(shuffled)


def test_completion_only_lm_head_matches_trl(tiny_model_dir):
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.dpo_trainer import completion_only_lm_head
    from pipeline.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 20))
    labels = ids.clone()
    labels[:, :12] = -100  # prompt
    labels[0, 17:] = -100  # padding

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grad = model.model.layers[0].mlp.down_proj.weight.grad.clone()
        return out, grad

    ref, ref_grad = run()
    with completion_only_lm_head():
        fast, fast_grad = run()
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.is_top1, ref.is_top1)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-6)
    import trl.trainer.utils as u
    assert u._use_triton(torch.device("cpu")) is False  # restored after the block
