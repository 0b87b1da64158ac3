"""PNG plots of the evaluation metrics (for the model card, `dvc plots` and MLflow)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import atomic_write_bytes

PASS_RATES_PNG = "eval_pass_rates.png"
WIN_RATE_PNG = "eval_win_rate.png"


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})  # stable bytes
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _err(m: dict[str, float], key: str) -> list[float]:
    return [m[key] - m[f"{key}_ci_low"], m[f"{key}_ci_high"] - m[key]]


def pass_rates(m: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    keys = ["pass_rate_base", "pass_rate_policy"]
    vals = [m[k] for k in keys]
    errs = list(zip(*[_err(m, k) for k in keys], strict=True))
    ax.bar([0, 1], vals, yerr=errs, capsize=6, color=["#9aa5b1", "#2b6cb0"], width=0.6,
           label="prompt-level (95% CI)")
    ax.scatter([0.38, 1.38], [m["constraint_pass_rate_base"], m["constraint_pass_rate_policy"]],
               marker="D", color="black", zorder=3, label="constraint-level")
    if m.get("pass_rate_floor") is not None:  # the best trivial answer (pipeline.eval.panel): beat it or nothing
        ax.axhline(m["pass_rate_floor"], color="#c53030", lw=1, ls="--", label="trivial-answer floor")
    ax.set_xticks([0, 1], ["base", "trained"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("prompt-level pass rate")
    ax.set_title(f"Test prompts (n={int(m['n_test_prompts'])})")
    ax.legend(loc="upper left", fontsize=8)
    deltas = ["pass_rate_delta", "constraint_pass_rate_delta"]
    ax2.errorbar([m[k] for k in deltas], [0, 1], xerr=list(zip(*[_err(m, k) for k in deltas], strict=True)),
                 fmt="o", capsize=6, color="#2b6cb0")
    ax2.axvline(0, color="grey", lw=1, ls="--")
    ax2.set_yticks([0, 1], ["prompt", "constraint"])
    ax2.set_ylim(-0.6, 1.6)
    ax2.set_xlabel("trained - base (95% bootstrap CI)")
    ax2.set_title("Paired difference")
    return _save(fig, path)


def win_rate(m: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    n = max(1, int(m["n_general_prompts"]))
    left = 0.0
    for key, color, label in (("n_wins", "#2b6cb0", "trained wins"), ("n_ties", "#cbd2d9", "tie"),
                              ("n_losses", "#c05621", "base wins")):
        ax.barh([0], [m[key] / n], left=left, color=color, label=f"{label} ({int(m[key])})")
        left += m[key] / n
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    consistent = m.get("judge_order_consistency", float("nan"))
    ax.set_title(f"Judged pairs, both orders (n={n}; same verdict in both orders: {consistent:.0%})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    ax2.bar(["win rate"], [m["win_rate"]], yerr=[[e] for e in _err(m, "win_rate")], capsize=6, color="#2b6cb0")
    ax2.bar(["LC win rate"], [m["lc_win_rate"]], color="#4c9f70")
    ax2.axhline(0.5, color="grey", lw=1, ls="--")
    ax2.set_ylim(0, 1)
    ax2.set_title(f"length ratio {m['length_ratio']:.2f}")
    return _save(fig, path)


def write_plots(metrics: dict[str, float], plots_dir: Path) -> list[Path]:
    """Both evaluation plots into `plots_dir`; returns their paths."""
    return [pass_rates(metrics, plots_dir / PASS_RATES_PNG), win_rate(metrics, plots_dir / WIN_RATE_PNG)]
