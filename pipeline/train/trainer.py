"""TRL's DPOTrainer with what this project adds for speed and reproducibility.

- Length-grouped batches: pairs of similar length share a micro-batch (less padding), in an order drawn
  from `seed + epoch`, so a resumed run sees the same batches as an uninterrupted one.
- Reference log-probs cached on disk (`paths.ref_logps`), keyed by the base model's and the tokenized
  data's hashes and every setting that changes them; reruns and sweeps skip the reference pass.
- On CPU, only completion tokens go through the LM head (TRL compacts only where Triton runs).
- Padding-free micro-batches (`packing`): the loss and the reference pass see the padded batch, the
  model only its real tokens (pipeline/train/packing.py).

Everything else (loss, metrics, checkpoints) is TRL's and transformers' own code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from trl import DPOTrainer

from pipeline.core.lineage import sha256_bytes, sha256_json
from pipeline.train.packing import PackedForward

log = logging.getLogger(__name__)

def pair_lengths(dataset) -> list[int]:
    """Tokens of the longer side of each tokenized pair (what the collator pads to)."""
    prompts = dataset["prompt_ids"]
    chosen = dataset["chosen_ids"]
    rejected = dataset["rejected_ids"]
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


class LengthGroupedEpochSampler(Sampler[int]):
    """transformers' length grouping (shuffle, then sort within mega-batches), seeded per epoch.

    The permutation depends only on `seed` and the epoch the trainer sets, never on the global RNG, so
    resuming mid-run reproduces the batches of an uninterrupted run.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths = lengths
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


def tokenized_data_hash(dataset) -> str:
    """sha256 of the token ids of every pair, in order (what the reference pass actually sees)."""
    rows = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    return sha256_bytes("".join(f"{p}|{c}|{r}\n" for p, c, r in rows).encode())


class OpenReleaseDPOTrainer(DPOTrainer):
    """DPOTrainer plus length-grouped batches and an on-disk reference log-prob cache."""

    def __init__(self, *args: Any, length_grouping: bool = False, packing: bool = False,
                 ref_cache_dir: str | Path | None = None, ref_cache_key: dict[str, Any] | None = None, **kwargs: Any):
        # Set before super().__init__: DPOTrainer precomputes reference log-probs inside its __init__.
        self._length_grouping = length_grouping
        self._packing = packing
        self._ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir is not None else None
        self._ref_cache_key = dict(ref_cache_key or {})
        self.ref_cache_events: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self._length_grouping or dataset is None or "prompt_ids" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        step_pairs = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedEpochSampler(pair_lengths(dataset), step_pairs, self.args.seed)

    # -- padding-free forward passes -----------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        return super()._compute_loss(PackedForward(model) if self._packing else model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(PackedForward(model) if self._packing else model, inputs)

    # -- reference log-probs -------------------------------------------------------------------------
    def ref_cache_key(self, dataset, name: str) -> dict[str, Any]:
        """Everything the reference log-probs depend on: the inputs (model and chat template from
        `ref_cache_key`, the token ids), the settings that change the values, the libraries, device,
        precision and attention kernel, and the sha256 of the code that computes them."""
        import trl.trainer.utils as trl_utils

        from pipeline.core.fingerprint import code_part, library_versions

        a = self.args
        model = self.accelerator.unwrap_model(self.ref_model or self.model)
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        return {"split": name, "data": tokenized_data_hash(dataset), "rows": len(dataset),
                "params": {"max_length": a.max_length, "truncation_mode": a.truncation_mode, "ld_alpha": self.ld_alpha,
                           "batch_size": a.precompute_ref_batch_size, "padding_free": a.padding_free,
                           "pad_to_multiple_of": a.pad_to_multiple_of, "packing": self._packing,
                           "compact_lm_head": bool(trl_utils._use_triton(self.accelerator.device))},
                "precision": "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32",
                "dtype": str(next(model.parameters()).dtype), "device": self.accelerator.device.type,
                "attn_implementation": attn, "versions": library_versions(),
                "code": code_part("pipeline.train.trainer"), **self._ref_cache_key}

    def ref_cache_path(self, key: dict[str, Any]) -> Path | None:
        if self._ref_cache_dir is None:
            return None
        return self._ref_cache_dir / f"{key['split']}-{sha256_json(key)[:32]}.safetensors"

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # The RNG is forked so a cache hit and a cache miss leave the training order identical (TRL's
        # precompute DataLoader draws from the global RNG).
        with torch.random.fork_rng(devices=[]):
            key = self.ref_cache_key(dataset, name)
            chosen, rejected, event = cached_reference(
                self.ref_cache_path(key), key, lambda: self._reference_pass(dataset, name, batch_size),
                Collectives(self.accelerator))
        self.ref_cache_events.append(event)
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    def _reference_pass(self, dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference pass (its `compute_ref_log_probs` per batch), without its Arrow cache file: that
        file's name is random for in-memory datasets, so other ranks could not find rank 0's."""
        from accelerate.utils import tqdm
        from torch.utils.data import DataLoader
        from trl.models import prepare_deepspeed

        # Longest first: batches pad little, and an out-of-memory error shows at once.
        order = _order_by_length(dataset)
        loader = DataLoader(dataset.select(order), batch_size=batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, shuffle=False,
                            pin_memory=self.args.dataloader_pin_memory)
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:  # parameters are not placed until train()
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen_parts, rejected_parts = [], []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})"):
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen_parts.append(c.float().cpu())
            rejected_parts.append(r.float().cpu())
        chosen = torch.empty(len(dataset), dtype=torch.float32)
        rejected = torch.empty(len(dataset), dtype=torch.float32)
        chosen[order] = torch.cat(chosen_parts)
        rejected[order] = torch.cat(rejected_parts)
        return chosen, rejected


class Collectives:
    """The two collectives the reference cache needs, over accelerate (no-ops in one process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def broadcast(self, obj: Any) -> Any:
        if self.accelerator.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def read_cached(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs if `path` holds them for exactly `key`, else None.

    The file name is a prefix of the key's hash; the full key stored inside must equal `key` and the
    tensors must have one value per row, so a collision, a truncated name or a hand-copied file misses.
    """
    import json

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("reference log-prob cache %s is unreadable (%s): recomputing", path.name, e)
        return None
    if stored != key:
        from pipeline.core.fingerprint import key_diff

        log.warning("reference log-prob cache %s was made for another key (%s): recomputing",
                    path.name, "; ".join(key_diff(stored, key)[:3]) if isinstance(stored, dict) else "no key")
        return None
    chosen, rejected = tensors.get("ref_chosen_logps"), tensors.get("ref_rejected_logps")
    if chosen is None or rejected is None or len(chosen) != key["rows"] or len(rejected) != key["rows"]:
        log.warning("reference log-prob cache %s does not hold %d rows: recomputing", path.name, key["rows"])
        return None
    return chosen, rejected


def cached_reference(path: Path | None, key: dict[str, Any], compute, coll) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Reference log-probs from the cache or from `compute()`, identically on every rank.

    The main process alone decides hit or miss and broadcasts the decision, so every rank takes the same
    path, and both paths then run the same collectives (broadcast of the values, then a barrier): a rank
    whose filesystem lacks the file neither deadlocks nor computes different values.
    """
    found = read_cached(path, key) if (path is not None and coll.is_main_process) else None
    hit = bool(coll.broadcast(found is not None))
    if hit:
        values = found
    else:
        values = compute()  # every rank: the reference pass gathers across ranks
    values = coll.broadcast(values if coll.is_main_process else None)
    chosen, rejected = values
    if not hit and path is not None and coll.is_main_process:
        import json

        _save_atomic(path, {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected},
                     json.dumps(key, sort_keys=True))
        log.info("reference log-probs for %s: computed and cached in %s", key["split"], path)
    elif hit:
        log.info("reference log-probs for %s: cache hit %s", key["split"], path.name)
    coll.barrier()
    return chosen, rejected, {"split": key["split"], "hit": hit, "file": path.name if path else None}


def _order_by_length(dataset) -> list[int]:
    lengths = pair_lengths(dataset)
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], key_json: str) -> None:
    """Write a safetensors file whose bytes depend only on its content.

    safetensors keeps `__metadata__` in a Rust HashMap, so several keys come out in a different order in
    every process (and the file's hash with them); the one key `key` (sorted JSON) has only one order.
    """
    from safetensors.torch import save

    from pipeline.core.io import atomic_write_bytes

    atomic_write_bytes(path, save(tensors, metadata={"key": key_json}))


@contextlib.contextmanager
def completion_only_lm_head(enabled: bool = True) -> Iterator[None]:
    """Make TRL's fused LM head score only completion positions on CPU too.

    TRL 1.16 compacts to the labelled positions only where its Triton kernel runs (CUDA/XPU), to avoid
    recompiling on shape changes elsewhere; plain CPU execution has no such cost, and the prompt and
    padding positions are most of a batch. On CPU the log-probs then come from materialized logits
    (pipeline/train/lm_head.py) instead of TRL's recomputing kernel. The values are unchanged up to float
    rounding (tests compare both paths).
    """
    import trl.trainer.utils as trl_utils

    from pipeline.train.lm_head import CpuLogProbFunction

    if not enabled:
        yield
        return
    original, original_fn = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = compact
    trl_utils._ChunkedLogProbFunction = CpuLogProbFunction(original_fn)
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = original, original_fn
