"""The sweep in the release: its table ships in the model repo, its sha256 in the manifest, and
`openrelease audit` re-applies the selection rule to it.

Release reads the sweep's output files (reports/sweep/), never the sweep wing; the rule itself is
pipeline/core/selection.py, shared with `openrelease sweep`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.io import read_json
from pipeline.core.lineage import sha256_file
from pipeline.core.params.sweep import SelectionRule
from pipeline.core.selection import config_matches, select

BUNDLE_DIR = "sweep"
TABLE = "table.json"


def table_path(root: Path, reports: str) -> Path:
    return root / reports / "sweep" / TABLE


def load_table(root: Path, reports: str) -> dict[str, Any] | None:
    path = table_path(root, reports)
    return read_json(path) if path.is_file() else None


def copy_into(root: Path, reports: str, model_dir: Path) -> dict[str, Any] | None:
    """Copy the sweep table, CSVs and plots into `model_dir/sweep/`; the manifest entry, or None."""
    src = table_path(root, reports).parent
    if not (src / TABLE).is_file():
        return None
    dest = model_dir / BUNDLE_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".json", ".csv", ".png"):
            shutil.copyfile(f, dest / f.name)
    table = read_json(dest / TABLE)
    return {"table": f"{BUNDLE_DIR}/{TABLE}", "sha256": sha256_file(dest / TABLE), "sweep_id": table.get("sweep_id"),
            "rule": table.get("rule"), "winner": table.get("winner")}


def released_value(lineage: dict[str, Any], key: str) -> Any:
    """The value of dotted params `key` as the release's stages read it (train first)."""
    stages = ["train", *[s for s in lineage if s != "train"]]
    for stage in stages:
        params = (lineage.get(stage) or {}).get("params") or {}
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in params:
                v: Any = params[head]
                for part in parts[cut:]:
                    if not isinstance(v, dict) or part not in v:
                        break
                    v = v[part]
                else:
                    return v
    return "<absent>"


def check(manifest: dict[str, Any], model_dir: Path) -> tuple[list[str], list[str]]:
    """Problems and notes: the table's sha256, the rule's pick from it, and the released params."""
    entry = manifest.get("sweep")
    if not entry:
        return [], ["no sweep in this release (one training run)"]
    path = model_dir / entry.get("table", f"{BUNDLE_DIR}/{TABLE}")
    if not path.is_file():
        return [f"sweep: {entry.get('table')} is missing from the release"], []
    if sha256_file(path) != entry.get("sha256"):
        return [f"sweep: {entry.get('table')} does not match the sha256 in the manifest"], []
    try:
        table = read_json(path)
    except DataError as e:
        return [f"sweep: {e}"], []
    rule = SelectionRule.model_validate(table["rule"])
    winner, _ = select(rule, table["configs"])
    if winner is None:
        return ["sweep: no configuration of the sweep table meets the rule's constraints, yet a model was released"], []
    pick = table["configs"][winner]
    problems = []
    recorded = (table.get("winner") or {}).get("config_index")
    if recorded != winner:
        problems.append(f"sweep: the table names configuration {recorded} the winner, the rule picks {winner}")
    released = {k: released_value(manifest.get("lineage") or {}, k) for k in [*pick["config"], table["seed_key"]]}
    want = {**pick["config"], table["seed_key"]: table["seeds"][0]}
    problems += [f"sweep: released {d}" for d in config_matches(want, released)]
    notes = [] if problems else [
        f"sweep: the rule ({rule.goal} {rule.metric}, {len(rule.constraints)} constraint(s)) picks configuration "
        f"{winner} of {len(table['configs'])} from the table (sha256 {entry['sha256'][:12]}...), and the release "
        f"was trained with it at seed {want[table['seed_key']]}"]
    return problems, notes


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def card_section(table: dict[str, Any] | None, bundled: bool = True) -> str:
    """The model card's Sweep section (markdown)."""
    if table is None:
        return ("No sweep was run for this release: it is one training run with one seed, and its intervals "
                "cover prompt sampling only.")
    rule, w = table["rule"], table.get("winner") or {}
    axes = "; ".join(f"`{k}` in {v}" for k, v in table["axes"].items())
    lines = [f"Grid: {axes}; seeds (`{table['seed_key']}`): {table['seeds']}; {len(table['members'])} members, "
             f"each a DVC experiment and an MLflow child run of the sweep run `{table.get('mlflow_parent_run_id')}`.",
             "",
             f"Selection rule, fixed in params.yaml before the sweep ran and applied mechanically: {rule['goal']} the "
             f"mean over seeds of `{rule['metric']}`, subject to {', '.join(rule['constraints']) or 'no constraints'}; "
             f"ties broken by {', '.join(rule['tie_break']) or 'grid order'}, then grid order. The released model is "
             f"the winning configuration trained with the first seed ({w.get('release_seed')}): `{w.get('release_member')}`.",
             "",
             f"Intervals: {table['interval_method']}.", ""]
    if w:
        lines += [f"**Winner: {w['label']}.** Picking the best of {w['configs_tried']} configurations inflates its "
                  f"score, so the comparison with the base model is adjusted for the configurations tried: "
                  f"one-sided p = {_f(w['p_vs_base'], 4)} unadjusted, **{_f(w['p_vs_base_holm'], 4)} Holm-adjusted**; "
                  f"Bonferroni {100 * w['bonferroni_level']:.1f}% interval of `{w['metric']}`: "
                  f"[{_f(w['bonferroni_ci'][0])}, {_f(w['bonferroni_ci'][1])}] (null value {rule['null_value']}).", ""]
        conf = table["configs"][w["config_index"]]
        lines += ["| headline metric | winner mean over seeds | seed std | 95% interval (seeds + prompts) |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {_f(conf['mean'].get(n))} | {_f(conf['std'].get(n))} | "
                  f"[{_f(conf['ci_low'].get(n))}, {_f(conf['ci_high'].get(n))}] |" for n in table["headline"]]
        lines.append("")
    head = table["headline"]
    lines += ["| configuration | " + " | ".join(f"{n} (mean ± seed std)" for n in head) + " | Holm p | eligible |",
              "|---|" + "---|" * (len(head) + 2)]
    for c in table["configs"]:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in c["config"].items())
        cells = [f"{_f(c['mean'].get(n))} ± {_f(c['std'].get(n))}" for n in head]
        ok = "yes" if not c.get("broken_constraints") else "no: " + "; ".join(c["broken_constraints"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_f(c.get('p_vs_base_holm'), 4)} | {ok} |")
    lines += ["", "| member (DVC experiment) | seed | MLflow run | " + " | ".join(head) + " |",
              "|---|---|---|" + "---|" * len(head)]
    for r in table["members"]:
        lines.append(f"| `{r['name']}` | {r['seed']} | `{r.get('mlflow_run_id')}` | "
                     + " | ".join(_f(r["metrics"].get(n)) for n in head) + " |")
    if bundled:
        lines.append("")
        for n in head:
            for axis in table["axes"]:
                lines.append(f"![{n} vs {axis}]({BUNDLE_DIR}/{n}_vs_{axis.split('.')[-1]}.png)")
    return "\n".join(lines)
