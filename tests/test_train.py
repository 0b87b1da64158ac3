"""The train stage: DPOConfig from params, checks, checkpoints, sampler, LM-head patch, and real (tiny)
training runs: determinism, cache reuse, resume after SIGKILL, and two DDP processes under accelerate."""

from __future__ import annotations

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

from pipeline.core.errors import DataError, ParamsError
from pipeline.core.lineage import sha256_file
from pipeline.core.params import load_params, parse_params

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
    t["dpo"].update(max_steps=4, num_train_epochs=2, precompute_ref_batch_size=4, warmup_steps=0)
    t.update(per_device_batch_size=2, global_batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    for k, v in train_overrides.items():
        t[k] = v
    return parse_params(raw)


# -- configuration ---------------------------------------------------------------------------------------
def test_dpo_config_builds_from_real_params(tmp_path):
    """A TRL upgrade that renames or drops a field used in params.yaml fails here, not on release day."""
    from trl import DPOConfig

    from pipeline.train.setup import build_dpo_config, make_plan

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
    from pipeline.train.setup import build_dpo_config, make_plan

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
    from pipeline.train.setup import derive_accumulation

    assert [derive_accumulation(8, 4, n) for n in (1, 2)] == [2, 1]
    assert derive_accumulation(32, 2, 4) == 4
    with pytest.raises(ParamsError, match=r"global_batch_size = 8 is not a multiple .* 3 x 1"):
        derive_accumulation(8, 3, 1)


def _plan(**kw):
    from pipeline.train.setup import Plan

    base = dict(device="cuda", world_size=1, local_processes=1, per_device_batch_size=4, grad_accumulation=2,
                global_batch_size=8, torch_threads=None, attn_implementation="sdpa", precision="bf16", packing=True,
                gradient_checkpointing=False, liger=False, distributed_type="NO")
    return Plan(**{**base, **kw})


def test_incompatible_combinations_are_refused():
    from pipeline.train.setup import check_compatible

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
    from pipeline.train.setup import make_plan, read_accelerate_config

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
    from pipeline.train import checkpoints

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
    from pipeline.train.trainer import LengthGroupedEpochSampler

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

    from pipeline.lm.loading import load_causal_lm
    from pipeline.train.trainer import completion_only_lm_head

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
    from trl.kernels import ChunkedLogProbFunction

    assert u._use_triton(torch.device("cpu")) is False  # restored after the block
    assert u._ChunkedLogProbFunction is ChunkedLogProbFunction


# -- real training on the tiny model ---------------------------------------------------------------------
def _run_kwargs(work: Path, tiny_model_dir: Path, data_dir: Path, p, *, ckpt: str = "ckpt", out: str = "out"):
    """What the stage passes to `run`, with the real sha256 of the model folder and the data."""
    from pipeline.core.lineage import sha256_path
    from pipeline.lm.template import check_template_dir
    from pipeline.stages.train import fingerprint

    (work / out).mkdir(parents=True, exist_ok=True)
    model_sha, data_sha = sha256_path(tiny_model_dir), sha256_path(data_dir / "train.parquet")
    template = check_template_dir(tiny_model_dir, tiny_model_dir, "test")
    return dict(root=ROOT, base_dir=tiny_model_dir, dataset_dir=data_dir, out_dir=work / out,
                checkpoints_dir=work / ckpt, ref_logps_dir=work / "ref", plots_dir=work / f"plots-{out}",
                model_sha256=model_sha, base_ref="models/base",
                fingerprint=fingerprint(p, model_sha, data_sha, root=ROOT, chat_template_sha256=template))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted 4-step run (cold reference cache); shared by the determinism and resume tests."""
    from pipeline.stages.train import run

    work = tmp_path_factory.mktemp("train")
    data = write_pairs(work / "data")
    p = tiny_params().train
    logged = []
    result = run(p, log_fn=lambda m, step: logged.append((step, m)), **_run_kwargs(work, tiny_model_dir, data, p))
    return work, data, p, result, logged


def test_training_writes_release_metrics_and_plots(first_run):
    from safetensors import safe_open

    work, _, p, result, logged = first_run
    out = work / "out"
    names = {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", "README.md")) for n in names)  # no pickle, no auto card
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())  # merged: plain weights of the base architecture
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/base"
    m = result["metrics"]
    assert m["steps"] == 4 and m["world_size"] == 1 and m["global_batch_size"] == 4 and m["grad_accumulation"] == 2
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["peak_rss_mb"] > 0 and m["ref_logps_cache_hit"] == 0.0
    assert {"rewards_chosen", "rewards_rejected", "rewards_accuracies", "rewards_margins", "logps_chosen"} <= set(m)
    steps = [s for s, metrics in logged if "loss" in metrics]
    assert steps == [1, 2, 3, 4]  # every optimizer step reached the tracking function
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "learning_rate"} <= set(logged[0][1])
    plots = work / "plots-out"
    assert (plots / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert len((plots / "metrics.csv").read_text().splitlines()) == 5
    assert {"loss.png", "rewards.png", "reward_accuracy.png"} <= {f.name for f in plots.iterdir()}
    assert result["dpo_config"]["beta"] == p.dpo["beta"] and result["hardware"]["trl"]
    assert result["plan"]["packing"] is True  # the default: padding-free micro-batches
    assert sorted(f.name for f in (work / "ckpt").iterdir()) == ["RUN.json", "checkpoint-4"]  # pruned to final


def test_same_inputs_same_weights_with_warm_reference_cache(first_run, tiny_model_dir):
    """Determinism: a second run (now hitting the reference cache) gives byte-identical weights."""
    from pipeline.stages.train import run

    work, data, p, first, _ = first_run
    again = run(p, **_run_kwargs(work, tiny_model_dir, data, p, ckpt="ckpt2", out="out2"))
    assert again["metrics"]["ref_logps_cache_hit"] == 1.0
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert sha256_file(work / "out2" / f) == sha256_file(work / "out" / f), f


def test_cpu_bf16_is_opt_in_and_keyed(first_run, tiny_model_dir):
    """train.precision = bf16 on CPU: TRL trains under bfloat16 autocast, the plan says so (lineage, keys),
    the fp32 run's reference cache is not reused, and the weights are other than fp32's."""
    import shutil

    from pipeline.stages.train import run
    from pipeline.train.setup import build_dpo_config, make_plan

    work, data, p, first, _ = first_run
    bf16 = p.model_copy(update={"precision": "bf16"})
    plan = make_plan(bf16, ROOT, world_size=1)
    assert (plan.device, plan.precision) == ("cpu", "bf16")
    cfg = build_dpo_config(bf16, plan, work / "cfg")
    assert cfg.bf16 and not cfg.fp16 and cfg.use_cpu
    # Its own reference dir, seeded with the fp32 run's cache: the shared one stays as the other tests expect.
    kw = _run_kwargs(work, tiny_model_dir, data, bf16, ckpt="ckpt-bf16", out="out-bf16")
    kw["ref_logps_dir"] = work / "ref-bf16"
    shutil.copytree(work / "ref", kw["ref_logps_dir"])
    res = run(bf16, **kw)
    assert len(list(kw["ref_logps_dir"].glob("train-*.safetensors"))) == 2  # fp32's kept, bf16's added
    assert res["plan"]["precision"] == "bf16" and res["metrics"]["ref_logps_cache_hit"] == 0.0
    assert res["metrics"]["steps"] == first["metrics"]["steps"]
    assert sha256_file(work / "out-bf16" / "adapter/adapter_model.safetensors") != sha256_file(
        work / "out" / "adapter/adapter_model.safetensors")


def test_changed_model_misses_the_reference_cache(first_run, tiny_model_dir, tmp_path):
    """The same data and params with other base weights: the reference cache (warm from the first run)
    misses, and the reference log-probs differ."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.stages.train import run

    work, data, p, first, _ = first_run
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 0.05 * torch.ones_like(weights[name])
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    kw = _run_kwargs(work, other, data, p, ckpt="ckpt-other", out="out-other")
    result = run(p, max_steps=1, **kw)
    assert result["metrics"]["ref_logps_cache_hit"] == 0.0
    files = sorted((work / "ref").glob("train-*.safetensors"))
    assert len(files) == 2  # one per model: nothing was overwritten
    a, b = (load_file(f)["ref_chosen_logps"] for f in files)
    assert not torch.equal(a, b)


def test_rerun_after_finished_training_reports_the_true_loss_and_resume(first_run, tiny_model_dir):
    """The stage killed after training but before its outputs were kept: the rerun resumes from the
    final checkpoint, trains 0 steps, and still reports the whole run's loss and steps, and that it resumed."""
    from pipeline.stages.train import run

    work, data, p, first, _ = first_run
    again = run(p, **_run_kwargs(work, tiny_model_dir, data, p, out="out-again"))
    m = again["metrics"]
    assert m["resumed"] == 1.0 and m["resumed_from_step"] == 4 and m["steps"] == 4 and m["steps_this_run"] == 0
    assert m["train_loss"] == pytest.approx(first["metrics"]["train_loss"]) and m["train_loss"] > 0
    assert again["resume"] == {"resumed": True, "resumed_from_step": 4, "steps_total": 4, "steps_this_run": 0,
                               "restart_reason": None}
    assert first["metrics"]["resumed"] == 0.0 and first["resume"]["resumed"] is False
    assert sha256_file(work / "out-again" / "model.safetensors") == sha256_file(work / "out" / "model.safetensors")


def test_sigkill_then_rerun_resumes_to_identical_weights(first_run, tiny_model_dir):
    """Kill the training process after its step-2 checkpoint, leave a partial later checkpoint behind (a
    kill during a write), rerun: it resumes from step 2 and ends with the uninterrupted run's weights."""
    from pipeline.stages.train import run
    from pipeline.train import checkpoints

    work, data, p, first, _ = first_run
    kw = _run_kwargs(work, tiny_model_dir, data, p, ckpt="ckpt-kill", out="out-kill")
    spec = {k: str(v) for k, v in kw.items() if isinstance(v, Path)}
    spec.update(train=p.model_dump(mode="json"), model_sha256=kw["model_sha256"], base_ref=kw["base_ref"],
                fingerprint=kw["fingerprint"], result=str(work / "kill-result.json"))
    (work / "spec.json").write_text(json.dumps(spec))
    # The worker entry point, with each step slowed down (numerics untouched) so that the kill surely
    # lands between checkpoint 2 and the end of training.
    code = ("import sys, time; from pipeline.train import trainer as d; from pipeline.stages import train as t; "
            "step = d.OpenReleaseDPOTrainer.training_step; "
            "d.OpenReleaseDPOTrainer.training_step = lambda self, *a, **k: (time.sleep(1.0), step(self, *a, **k))[1]; "
            "t._worker(sys.argv[1])")
    log_file = work / "killed.log"
    with open(log_file, "wb") as log:  # a file, not a pipe: progress bars would fill a pipe and block
        proc = subprocess.Popen([sys.executable, "-c", code, str(work / "spec.json")], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    ckpt = work / "ckpt-kill"
    deadline = time.monotonic() + 240
    while not checkpoints.is_complete(ckpt / "checkpoint-2"):
        assert proc.poll() is None, log_file.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "checkpoint-4").exists() and not (work / "kill-result.json").exists()
    _fake_checkpoint(ckpt, 3, state=False)  # what a kill during checkpoint-3's write would leave
    resumed = run(p, **kw)
    assert resumed["resumed_from"] == "checkpoint-2" and resumed["metrics"]["steps"] == 4
    assert resumed["metrics"]["resumed"] == 1.0 and resumed["metrics"]["resumed_from_step"] == 2
    assert resumed["metrics"]["train_loss"] == pytest.approx(first["metrics"]["train_loss"], rel=1e-4)
    assert sha256_file(work / "out-kill" / "model.safetensors") == sha256_file(work / "out" / "model.safetensors")
    rows = (work / "plots-out-kill" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5  # the curves cover the whole run, restored from the checkpoint's log history


def test_stage_runs_two_ddp_processes_under_accelerate(tmp_path, tiny_model_dir, monkeypatch):
    """The whole stage with launcher accelerate + configs/accelerate/ddp.yaml x 2 CPU processes (gloo):
    world size 2, global batch kept (1 per device x 2 devices x 2 accumulation), MLflow metrics logged
    live from rank 0, the LoggedModel registered, lineage and metrics written."""
    from mlflow.tracking import MlflowClient

    from pipeline.core.stage import run_stage
    from pipeline.stages import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["base_model"] = str(tiny_model_dir)
    t = raw["train"]
    t["dpo"].update(max_steps=2, precompute_ref_batch_size=2, warmup_steps=0)
    t.update(per_device_batch_size=1, global_batch_size=4, checkpoint_every=1,
             launcher={"kind": "accelerate", "config": str(ROOT / "configs/accelerate/ddp.yaml"), "num_processes": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    write_pairs(tmp_path / raw["paths"]["dataset"], n=8)
    run_stage(train.STAGE, train.READS, train._body, params_file=tmp_path / "params.yaml", root=tmp_path)

    metrics = json.loads((tmp_path / raw["paths"]["metrics"] / "train.json").read_text())
    assert metrics["world_size"] == 2  # two processes formed one world (not two lone trainers)
    assert (metrics["per_device_batch_size"], metrics["grad_accumulation"], metrics["global_batch_size"]) == (1, 2, 4)
    assert metrics["steps"] == 2
    lineage = json.loads((tmp_path / raw["paths"]["lineage"] / "train.json").read_text())
    assert lineage["extra"]["train"]["world_size"] == 2
    assert lineage["extra"]["train"]["plan"]["distributed_type"] == "MULTI_GPU"
    assert {Path(o["path"]).name for o in lineage["outputs"]} >= {"trained", "train", "train.json"}
    assert (tmp_path / raw["paths"]["model"] / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    facts = json.loads((tmp_path / ".openrelease" / "runs" / "train.json").read_text())  # run ids: the run record
    run = client.get_run(facts["mlflow"]["run_id"])
    assert run.data.metrics["world_size"] == 2
    history = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert sorted(m.step for m in history) == [1, 2]  # logged live by rank 0 of the accelerate workers
    model = client.get_logged_model(facts["mlflow_model_id"])
    assert model.source_run_id == run.info.run_id


@pytest.mark.gpu
def test_cuda_training_uses_bf16_and_writes_release(tmp_path, tiny_model_dir):
    """On a CUDA machine (`pytest -m gpu`): mixed precision, no CPU-only patch, same outputs."""
    import torch

    from pipeline.stages.train import run

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    p = tiny_params(device="cuda", gradient_checkpointing=True).train
    result = run(p, **_run_kwargs(tmp_path, tiny_model_dir, write_pairs(tmp_path / "data"), p))
    assert result["plan"]["precision"] in ("bf16", "fp16") and result["plan"]["gradient_checkpointing"] is True
    assert result["dpo_config"]["use_cpu"] is False and result["metrics"]["peak_gpu_mem_mb"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
