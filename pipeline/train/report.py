"""What the train stage reports: live metrics, DVC plots data, PNG curves, hardware and memory.

The callback forwards every TRL log (loss, rewards/*, logps/*, logits/*, entropy, learning rate, grad
norm, num_tokens) to a `log_fn(metrics, step)` (MLflow via pipeline.core.tracking) on the main process. The
plots are written at the end from the trainer's `log_history`, which a resumed run restores from its
checkpoint, so the curves cover the whole run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import platform
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.core.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int | None], None]
# Curves drawn as PNG: file name -> (title, metric keys as TRL names them).
CURVES = {
    "loss.png": ("DPO loss", ["loss"]),
    "rewards.png": ("implicit rewards (beta x log-ratio to the reference)",
                    ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    "reward_accuracy.png": ("reward accuracy (chosen scored above rejected)", ["rewards/accuracies"]),
    "logps.png": ("policy log-probability of the completions", ["logps/chosen", "logps/rejected"]),
    "learning_rate.png": ("learning rate", ["learning_rate"]),
}


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class MetricsCallback(TrainerCallback):
    """Send each log to `log_fn` from the main process only (every rank logs the same gathered values)."""

    def __init__(self, log_fn: LogFn | None = None):
        self.log_fn = log_fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.log_fn is None:
            return
        metrics = _numeric(logs)
        if metrics:
            self.log_fn(metrics, state.global_step)


def step_rows(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-step training logs (not the end-of-training summary), one row per logged step."""
    rows = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        rows.append({"step": int(entry["step"]), **{k: v for k, v in _numeric(entry).items() if k != "step"}})
    return rows


def write_plots(rows: list[dict[str, float]], folder: Path) -> list[Path]:
    """`metrics.csv` (DVC plots data) and the PNG curves; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r if k != "step"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *keys], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in ["step", *keys]})
    written = [atomic_write_text(folder / "metrics.csv", buf.getvalue())]
    for name, (title, metrics) in CURVES.items():
        present = [m for m in metrics if any(m in r for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for m in present:
            pts = [(r["step"], r[m]) for r in rows if m in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                    markersize=3, label=m)
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", metadata={"Software": None})  # no version string: stable bytes
        plt.close(fig)
        written.append(atomic_write_bytes(folder / name, png.getvalue()))
    return written


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model and cores, GPU model and count, CUDA and library versions (for tags and lineage)."""
    from importlib import metadata

    import torch

    from pipeline.train.setup import cores_available

    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_cores_available": cores_available(),
                            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                            "cuda": torch.version.cuda, "torch": torch.__version__}
    if info["gpu_count"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info
