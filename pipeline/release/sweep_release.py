"""The sweep in the release: its table ships in the model repo, its sha256 and the `sweep` params in the
manifest, and `openrelease audit` checks it.

The audit does not trust the table's derived numbers: it recomputes every configuration's mean and seed
std from the member rows, recomputes Holm over every configuration tried, holds the table's grid and
rule to the signed manifest's `sweep` params and to params.yaml at the release tag (when a clone has
it), re-applies the rule, and checks the released model was trained with the pick.

Release reads the sweep's output files (reports/sweep/, written by the `sweep_report` stage), never the
sweep wing; the rule and Holm are pipeline/core/selection.py, shared with `openrelease sweep`.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.core.errors import DataError, ParamsError
from pipeline.core.io import read_json
from pipeline.core.lineage import sha256_file
from pipeline.core.params.sweep import SelectionRule
from pipeline.core.selection import config_matches, holm, select

BUNDLE_DIR = "sweep"
TABLE = "table.json"
GRID_KEYS = ("axes", "seed_key", "seeds", "headline")  # the table's copy of params `sweep`, besides the rule


def table_path(root: Path, reports: str) -> Path:
    return root / reports / "sweep" / TABLE


def read_table(root: Path, reports: str) -> dict[str, Any] | None:
    """The sweep_report stage's table as written (None when the stage has not run)."""
    path = table_path(root, reports)
    return read_json(path) if path.is_file() else None


def load_table(root: Path, reports: str) -> dict[str, Any] | None:
    """The table of a sweep that ran, else None (no table, or one that says no sweep ran)."""
    table = read_table(root, reports)
    return table if table is not None and table.get("ran", True) else None


def copy_into(root: Path, reports: str, model_dir: Path) -> dict[str, Any] | None:
    """Copy the sweep table, CSVs and plots into `model_dir/sweep/`; the manifest entry, or None."""
    if load_table(root, reports) is None:
        return None
    src = table_path(root, reports).parent
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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(stored: Any, recomputed: float | None, abs_tol: float = 1e-12) -> bool:
    """Equal to rounding; an absent and an undefined (None, NaN) value are the same."""
    if recomputed is None or not _finite(recomputed):
        return stored is None or (isinstance(stored, float) and math.isnan(stored))
    return _finite(stored) and math.isclose(float(stored), recomputed, rel_tol=1e-9, abs_tol=abs_tol)


def _num(v: Any) -> str:
    return f"{v:.6g}" if _finite(v) else repr(v)


def recompute_problems(table: dict[str, Any]) -> list[str]:
    """Every configuration's members, mean and seed std recomputed from the member rows, and Holm over
    every configuration tried, compared with what the table stores."""
    members, confs, seeds = table.get("members") or [], table.get("configs") or [], table.get("seeds") or []
    problems = []
    if len(members) != len(confs) * len(seeds):
        problems.append(f"sweep: {len(members)} member rows, but {len(confs)} configurations x {len(seeds)} seeds")
    for c in confs:
        ci = c.get("config_index")
        rows = [r for r in members if r.get("config_index") == ci]
        where = f"sweep: configuration {ci} ({json.dumps(c.get('config'))})"
        if sorted(r.get("seed") for r in rows) != sorted(seeds) or any(r.get("config") != c.get("config") for r in rows):
            problems.append(f"{where}: its member rows are not one per seed {seeds} with this configuration")
        if c.get("members") != [r.get("name") for r in rows]:
            problems.append(f"{where}: lists members {c.get('members')}, the member rows are {[r.get('name') for r in rows]}")
        for name in sorted(c.get("mean") or {}):  # a metric the rule needs but the means lack: select() says so
            xs = [float(v) for r in rows if _finite(v := (r.get("metrics") or {}).get(name))]
            mean = statistics.fmean(xs) if xs else None
            std = statistics.stdev(xs) if len(xs) > 1 else None
            for part, value in (("mean", mean), ("std", std)):
                stored = (c.get(part) or {}).get(name)
                if not _same(stored, value):
                    problems.append(f"{where}: `{name}` {part} {_num(stored)} in the table, {_num(value)} from its "
                                    "member rows")
    stored_holm = [c.get("p_vs_base_holm") for c in confs]
    for c, want, got in zip(confs, holm([c.get("p_vs_base") for c in confs]), stored_holm, strict=True):
        if not _same(got, want, abs_tol=0.0):  # p-values can be tiny: relative agreement only
            problems.append(f"sweep: configuration {c.get('config_index')}: Holm-adjusted p {_num(got)} in the table, "
                            f"{_num(want)} over all {len(confs)} configurations tried")
    w = table.get("winner") or {}
    if w and w.get("configs_tried") != len(confs):
        problems.append(f"sweep: the winner's Holm family counts {w.get('configs_tried')} configurations, "
                        f"the table tried {len(confs)}")
    return problems


def _rule_dump(raw: Any) -> dict[str, Any]:
    """A selection rule with its defaults filled in, as the table stores it (raises ValidationError)."""
    return SelectionRule.model_validate(raw).model_dump(mode="json")


def params_problems(table: dict[str, Any], sweep: Any, source: str) -> list[str]:
    """Where the table's grid or rule differs from a params `sweep` section (`source` names where it is)."""
    if not isinstance(sweep, dict):
        return [f"sweep: {source} has no `sweep` section, yet the release ships a sweep table"]
    problems = []
    for key in GRID_KEYS:
        if json.loads(json.dumps(sweep.get(key))) != table.get(key):
            problems.append(f"sweep: the table's {key} {table.get(key)!r} is not {source}'s sweep.{key} "
                            f"{sweep.get(key)!r}")
    try:
        want = _rule_dump(sweep.get("selection"))
    except ValidationError as e:
        return [*problems, f"sweep: {source}'s sweep.selection is not a valid rule: {e.errors()[0]['msg']}"]
    for key in sorted(set(want) | set(table.get("rule") or {})):
        if want.get(key) != (table.get("rule") or {}).get(key):
            problems.append(f"sweep: the table's rule has {key} = {(table.get('rule') or {}).get(key)!r}, "
                            f"{source} has sweep.selection.{key} = {want.get(key)!r}")
    return problems


def check(manifest: dict[str, Any], model_dir: Path, at_tag: tuple[Any, str] | None = None) -> tuple[list[str], list[str]]:
    """Problems and notes: the table's sha256, its numbers recomputed from the member rows, its rule
    against the signed manifest's and (given `at_tag`: params.yaml's `sweep` at the release tag, and
    where it was read) the repository's, the rule's pick, and the released params."""
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
    try:
        rule = SelectionRule.model_validate(table.get("rule"))
    except ValidationError as e:
        return [f"sweep: the table's rule is not a valid selection rule: {e.errors()[0]['msg']}"], []
    problems = recompute_problems(table)
    if "sweep" not in (manifest.get("params") or {}):
        problems.append("sweep: the manifest's params carry no `sweep` section: the table's rule is not signed")
    else:
        problems += params_problems(table, manifest["params"]["sweep"], "the signed manifest")
    notes = []
    if at_tag is not None:
        problems += params_problems(table, at_tag[0], at_tag[1])
    try:
        winner, _ = select(rule, table.get("configs") or [])
    except ParamsError as e:
        return [*problems, f"sweep: the rule cannot be applied to the table: {e}"], []
    if winner is None:
        return [*problems, "sweep: no configuration of the sweep table meets the rule's constraints, yet a model "
                           "was released"], []
    pick = table["configs"][winner]
    recorded = (table.get("winner") or {}).get("config_index")
    if recorded != winner:
        problems.append(f"sweep: the table names configuration {recorded} the winner, the rule picks {winner}")
    released = {k: released_value(manifest.get("lineage") or {}, k) for k in [*pick["config"], table["seed_key"]]}
    want = {**pick["config"], table["seed_key"]: table["seeds"][0]}
    problems += [f"sweep: released {d}" for d in config_matches(want, released)]
    if not problems:
        notes.append(
            f"sweep: each configuration's mean and seed std recomputed from its {len(table['seeds'])} member rows, "
            f"Holm over all {len(table['configs'])} configurations; the rule ({rule.goal} {rule.metric}, "
            f"{len(rule.constraints)} constraint(s)) equals the signed manifest's"
            + (f" and {at_tag[1]}'s" if at_tag is not None else "")
            + f", picks configuration {winner} of {len(table['configs'])} from the table (sha256 "
            f"{entry['sha256'][:12]}...), and the release was trained with it at seed {want[table['seed_key']]}")
        if at_tag is None:
            notes.append("sweep: rule not compared with params.yaml at the release tag (its commit is not in a local clone)")
    return problems, notes


def _f(v: Any, digits: int = 3) -> str:
    """None: not measured (n/a); NaN: measured, but undefined (a degenerate interval), shown as NaN."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _p(v: Any) -> str:
    """A p-value: 4 decimals, or 2 significant digits when smaller than that shows."""
    return f"{v:.1e}" if _finite(v) and 0 < v < 1e-4 else _f(v, 4)


def card_section(table: dict[str, Any] | None, bundled: bool = True) -> str:
    """The model card's Sweep section (markdown): chosen on dev, the pick reported on test."""
    if table is None:
        return ("No sweep was run for this release: it is one training run with one seed, and its intervals "
                "cover prompt sampling only.")
    rule, w = table["rule"], table.get("winner") or {}
    axes = "; ".join(f"`{k}` in {v}" for k, v in table["axes"].items())
    k = len(table["seeds"])
    lines = [f"Grid: {axes}; seeds (`{table['seed_key']}`): {table['seeds']}; {len(table['members'])} members, "
             f"each a DVC experiment and an MLflow child run of the sweep run `{table.get('mlflow_parent_run_id')}`.",
             "",
             f"Selection rule, fixed in params.yaml before the sweep ran and applied mechanically: {rule['goal']} the "
             f"mean over seeds of `{rule['metric']}`, measured on the **dev** prompts, subject to "
             f"{', '.join(rule['constraints']) or 'no constraints'}; ties broken by "
             f"{', '.join(rule['tie_break']) or 'grid order'}, then grid order. The test prompts played no part in "
             f"the choice; they only report it. The released model is the winning configuration trained with the "
             f"first seed ({w.get('release_seed')}): `{w.get('release_member')}`; the evaluation section above is "
             f"that one model, the tables here give the spread over its {k} seeds.",
             "",
             f"Intervals: {table['interval_method']}. An interval shown as NaN could not be estimated (the data "
             "showed no variability, or too few prompts); it is not certainty.", ""]
    if w:
        lines += [f"**Winner: {w['label']}.** Picking the best of {w['configs_tried']} configurations on dev inflates "
                  f"its dev score, so its comparison with the base model on dev is adjusted for every configuration "
                  f"tried (Holm; a configuration whose p-value is undefined counts as p = 1): one-sided p = "
                  f"{_p(w['p_vs_base'])} unadjusted, **{_p(w['p_vs_base_holm'])} Holm-adjusted**; Bonferroni "
                  f"{100 * w['bonferroni_level']:.1f}% interval of `{w['metric']}`: [{_f(w['bonferroni_ci'][0])}, "
                  f"{_f(w['bonferroni_ci'][1])}] (null value {rule['null_value']}).", ""]
        conf = table["configs"][w["config_index"]]
        lines += [f"The pick on the **test** prompts, which the choice never read (the headline metrics: mean over "
                  f"its {k} seeds ± seed std; length and KL, the drift guards, are over every evaluation response):",
                  "", "| metric | mean over seeds ± seed std | 95% interval (seeds + prompts) | per seed |",
                  "|---|---|---|---|"]
        seeds = [r for r in table["members"] if r["config_index"] == w["config_index"]]
        lines += [f"| {n} | {_f(conf['mean'].get(n))} ± {_f(conf['std'].get(n))} | "
                  f"[{_f(conf['ci_low'].get(n))}, {_f(conf['ci_high'].get(n))}] | "
                  + ", ".join(_f(r["metrics"].get(n)) for r in seeds) + " |" for n in table["headline"]]
        lines.append("")
    head = table["headline"]
    sel = rule["metric"]
    lines += [f"| configuration | {sel} (dev: chosen on) | " + " | ".join(head) + " | Holm p (dev) | eligible |",
              "|---|---|" + "---|" * (len(head) + 2)]
    for c in table["configs"]:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in c["config"].items())
        cells = [f"{_f(c['mean'].get(n))} ± {_f(c['std'].get(n))}" for n in [sel, *head]]
        ok = "yes" if not c.get("broken_constraints") else "no: " + "; ".join(c["broken_constraints"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_p(c.get('p_vs_base_holm'))} | {ok} |")
    lines += ["", f"| member (DVC experiment) | seed | MLflow run | {sel} (dev) | " + " | ".join(head) + " |",
              "|---|---|---|---|" + "---|" * len(head)]
    for r in table["members"]:
        lines.append(f"| `{r['name']}` | {r['seed']} | `{r.get('mlflow_run_id')}` | "
                     + " | ".join(_f(r["metrics"].get(n)) for n in [sel, *head]) + " |")
    if bundled:
        lines.append("")
        for n in head:
            for axis in table["axes"]:
                lines.append(f"![{n} vs {axis}]({BUNDLE_DIR}/{n}_vs_{axis.split('.')[-1]}.png)")
    return "\n".join(lines)
