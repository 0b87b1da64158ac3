"""The model card and the dataset card (huggingface_hub ModelCard / DatasetCard).

Every number comes from a pipeline output (metrics, lineage records, reports, dvc.lock); a missing one
is printed as missing, never guessed. The evaluation table is rendered by `eval_table`, which
`openrelease audit` calls again on the bundled results to check the card was not edited.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.release.card_sections import CITATIONS, describe, quick_start, results_summary, rounds_section
from pipeline.release.dataset_repo import EVAL_ANSWERS, prompt_set_split
from pipeline.release.eval_card import evaluation_notes
from pipeline.release.inputs import RELEASE_STAGES, ReleaseInputs, flat_numbers
from pipeline.release.licenses import LicenseDecision, hub_metadata
from pipeline.release.manifest import ReleaseInfo
from pipeline.release.takedowns import dataset_section, model_section, removals

MISSING = "*missing*"
# metrics/eval.json keys the evaluate stage promises, shown first and flagged when absent.
EVAL_KEYS = ("pref_accuracy", "reward_margin", "pass_rate_base", "pass_rate_policy", "pass_rate_delta",
             "pass_rate_floor", "degenerate_rate_base", "degenerate_rate_policy", "win_rate", "lc_win_rate",
             "length_ratio", "kl")
EVAL_LABELS = {
    "pref_accuracy": "held-out preference accuracy (implicit DPO reward, chosen > rejected)",
    "reward_margin": "mean implicit reward margin (chosen - rejected)",
    "pass_rate_base": "verifiable pass rate, base model (greedy)",
    "pass_rate_policy": "verifiable pass rate, this model (greedy)",
    "pass_rate_delta": "pass rate difference (this model - base)",
    "pass_rate_floor": "best pass rate of a trivial answer (empty, echo, one fixed answer, base answer repeated or cut)",
    "degenerate_rate_base": "share of all evaluation answers that are degenerate (params validity), base model",
    "degenerate_rate_policy": "share of all evaluation answers that are degenerate (params validity), this model",
    "degenerate_rate_delta": "degenerate share difference (this model - base)",
    "win_rate": "judged win rate vs base (both orders, ties = 1/2)",
    "lc_win_rate": "length-controlled win rate vs base",
    "length_ratio": "mean response length, this model / base",
    "kl": "estimated KL(this model || base) on evaluation prompts",
    "constraint_pass_rate_base": "share of single constraints met, base model",
    "constraint_pass_rate_policy": "share of single constraints met, this model",
    "constraint_pass_rate_delta": "constraint-level pass rate difference (this model - base)",
    "win_rate_soft": "win rate from the judge's probabilities instead of verdicts",
    "judge_order_consistency": "share of pairs where both orders name the same winner",
    "judge_unparsed": "judge answers that could not be read",
    "length_base": "mean response length of the base model (tokens)",
    "length_policy": "mean response length of this model (tokens)",
    "kl_per_token": "estimated KL per generated token",
    "n_test_prompts": "held-out constraint prompts evaluated",
    "n_constraints": "constraints checked over those prompts",
    "n_general_prompts": "general prompts judged",
    "empty_rate_base": "share of empty responses, base model",
    "empty_rate_policy": "share of empty responses, this model",
    "unfinished_rate_base": "share of responses cut at max_new_tokens, base model",
    "unfinished_rate_policy": "share of responses cut at max_new_tokens, this model",
    "lc_win_rate_se": "AlpacaEval's standard error of the LC win rate (sem of the GLM predictions)",
    "judge_reliable": "1 if judge_order_consistency reaches evaluate.judge.min_order_consistency and, where "
                      "measured, Cohen's kappa with people has an interval above 0",
    "judge_human_agreement": "share of human-labelled pairs (paths.judge_labels) where the judge picks the people's answer",
    "judge_human_kappa": "Cohen's kappa of the judge with people on paths.judge_labels (0: chance)",
    "judge_human_n_judged": "human-labelled pairs the judge judged (pairs settled by rule are not counted)",
    "pref_n_prompts": "prompts the held-out test pairs come from (the bootstrap's clusters)",
    "ifeval_prompt_strict_base": "IFEval prompt-level strict accuracy, base model",
    "ifeval_prompt_strict_policy": "IFEval prompt-level strict accuracy, this model",
    "ifeval_prompt_strict_valid_base": "IFEval prompt-level strict, empty/unfinished answers failed, base",
    "ifeval_prompt_strict_valid_policy": "IFEval prompt-level strict, empty/unfinished answers failed, this model",
    "ifeval_heldout_inst_strict_policy": "IFEval instruction-level strict on ids never used in training, this model",
    "ifeval_indist_inst_strict_policy": "IFEval instruction-level strict on ids used in training, this model",
}
CI_SUFFIXES = (("_ci_low", "_ci_high"), ("_low", "_high"))
PREF_PREFIXES = ("pref_", "reward_")


def fmt(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return "`" + json.dumps(v, ensure_ascii=False) + "`"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in r) + " |"
              for r in rows]
    return "\n".join(lines)


def eval_metrics(metrics: dict[str, Any] | None) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, ci_low, ci_high) for each evaluation metric: promised keys first, interval keys folded in."""
    m = dict(metrics or {})
    interval_keys = set()
    for key in list(m):
        for lo, hi in CI_SUFFIXES:
            if key.endswith(lo) and key[: -len(lo)] in m:
                interval_keys |= {key, key[: -len(lo)] + hi}
    rows = []
    for key in [*EVAL_KEYS, *sorted(k for k in m if k not in EVAL_KEYS and k not in interval_keys)]:
        v = m.get(key)
        if isinstance(v, (dict, list, str)) or isinstance(v, bool):
            continue
        lo = next((m.get(key + a) for a, _ in CI_SUFFIXES if key + a in m), None)
        hi = next((m.get(key + b) for _, b in CI_SUFFIXES if key + b in m), None)
        rows.append((key, v, lo, hi))
    return rows


def eval_table(metrics: dict[str, Any] | None) -> str:
    """The card's evaluation table; audit re-renders it from the bundled results and compares."""
    rows = []
    for key, v, lo, hi in eval_metrics(metrics):
        interval = f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None or hi is not None else ""
        rows.append([f"`{key}`", EVAL_LABELS.get(key) or describe(key), fmt(v), interval])
    return _table(["metric", "what it measures", "value", "95% interval"], rows)


def model_index_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """metric key -> value of what goes into the model-index and `.eval_results/` (hub_results.SPECS:
    this model's own results, once each; no base, floor, panel, dev, counts or unreliable judge)."""
    from pipeline.release.hub_results import indexed

    return {spec.key: v for spec, v, _ in indexed(metrics)}


EVAL_PROMPTS_CONFIG = "test_prompts"


def eval_prompts_dataset(info: ReleaseInfo) -> dict[str, str]:
    """Where the held-out evaluation prompts are published: a config of the release's dataset repo."""
    return dict(dataset_type=info.dataset_repo, dataset_name="held-out evaluation prompts",
                dataset_config=EVAL_PROMPTS_CONFIG, dataset_split="test", dataset_revision=info.version)


def dataset_configs(inp: ReleaseInputs) -> list[dict[str, Any]]:
    """The dataset repo's configs: the preference splits (default, TRL's columns), each side table
    (provenance) and each evaluation prompt set, so `load_dataset(repo, name)` loads every one."""
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": s, "path": f"data/{s}.parquet"} for s in inp.splits]}]
    configs += [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}.parquet"}]}
                for name in inp.side_tables]
    for name in inp.eval_prompt_sets():   # the rows of eval/<name>/ as Parquet (see bundle.eval_set_parquet)
        split = prompt_set_split(name)      # named by the prompts' role: train, validation (dev) or test
        configs.append({"config_name": name, "data_files": [{"split": split, "path": f"data/{name}/{split}.parquet"}]})
    if inp.eval_tables:  # both models' answers and verdicts, one split per evaluated prompt set
        configs.append({"config_name": EVAL_ANSWERS, "data_files": [
            {"split": unit, "path": f"data/{EVAL_ANSWERS}/{unit}.parquet"} for unit in inp.eval_tables]})
    return configs


def validate_cards(model_readme: Path, dataset_readme: Path, endpoint: str) -> None:
    """Both cards through the Hub's own check (`ModelCard.validate` / `DatasetCard.validate`, which post
    to `<endpoint>/api/validate-yaml`); raises GateError naming the card and the Hub's reasons."""
    from unittest import mock

    import yaml
    from huggingface_hub import DatasetCard, ModelCard, constants
    from huggingface_hub.errors import HfHubHTTPError

    from pipeline.core.errors import GateError, SourceError

    for cls, path in ((ModelCard, model_readme), (DatasetCard, dataset_readme)):
        try:
            card = cls(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError) as e:
            raise GateError(f"{cls.repo_type} card {path.name} fails the Hub's metadata validation at {endpoint}: "
                            f"its YAML does not parse ({' '.join(str(e).split())[:200]})") from None
        try:
            with mock.patch.object(constants, "ENDPOINT", endpoint.rstrip("/")):  # validate() reads only this
                card.validate()
        except ValueError as e:
            reasons = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
            raise GateError(f"{card.repo_type} card {path.name} fails the Hub's metadata validation at {endpoint}: "
                            f"{reasons}") from None
        except HfHubHTTPError as e:
            raise SourceError(f"card validation at {endpoint}/api/validate-yaml failed: {str(e).splitlines()[0]}") from None


def model_index_results(metrics: dict[str, Any] | None, info: ReleaseInfo):
    """EvalResult entries for the card metadata; the interval, where there is one, in `metric_args`."""
    from pipeline.release.hub_results import model_index_results as results

    return results(metrics, info)


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {i}" for i in items) if items else MISSING


def _numbers_table(d: dict[str, Any] | None, what: str) -> str:
    nums = flat_numbers(d)
    if not nums:
        return f"{what}: {MISSING}"
    return _table(["count", "value"], [[f"`{k}`", v] for k, v in nums.items()])


def _sources_table(inp: ReleaseInputs) -> str:
    sources = inp.data_sources()
    if not sources:
        return f"Data sources: {MISSING} (no `data.sources` in the ingest lineage record or params)"
    rows_by_path = {}
    for a in (inp.record("ingest") or {}).get("inputs", []):
        rows_by_path[a.get("path")] = a
    rows = []
    for s in sources:
        path = inp.source_path(s)
        revision = path.rsplit("@", 1)[1] if path.startswith("hf://") and "@" in path else None
        art = rows_by_path.get(path)
        # the on-policy samples are rate's rows in UltraFeedback's layout, not UltraFeedback data
        kind = ("on-policy samples rated by `rate` (UltraFeedback layout)" if path == str(inp.params.paths.rated)
                else str(s.get("format", MISSING)))
        rows.append([str(s.get("name")), kind, f"`{path}`",
                     revision or (f"sha256 `{art['sha256'][:12]}`" if art else MISSING),
                     str(s.get("license") or MISSING), art.get("rows") if art else None])
    return _table(["source", "format", "path", "revision", "license", "rows read"], rows)


def _license_section(lic: LicenseDecision, what: str) -> str:
    lines = [f"This {what} is released under **{lic.release if what == 'model' else lic.dataset}**."]
    rows = [[i["role"], str(i["name"]), str(i["license"] or MISSING), i["kind"]] for i in lic.inputs]
    lines += ["", "Derived from these inputs:", "", _table(["input", "name", "license", "kind"], rows)]
    if lic.conflicts:
        lines += ["", "Conflicts found when deriving the license:", "", _bullets(lic.conflicts)]
    if lic.override:
        lines += ["", f"**License override:** the derived license was {lic.derived}; params set "
                      f"`card.license_override` to {lic.override['license']} for this reason: "
                      f"{lic.override['reason']}"]
    lines += ["", "The derivation is a conservative screen of the declared licenses, not legal advice."]
    return "\n".join(lines)


def _generation_backend_lines(inp: ReleaseInputs) -> list[str]:
    """How the on-policy completions were sampled: backend and weight precision (int8 is opt-in)."""
    gb = ((inp.lineage.get("generate") or {}).get("extra") or {}).get("generation_backend")
    if not gb:
        return []
    conv = gb.get("conversion") or {}
    key = f"; converted folder key `{conv['key'][:12]}` (ctranslate2 {conv.get('ctranslate2')})" if conv.get("key") else ""
    return ["", f"On-policy completions (`generate`) were sampled with the {gb.get('backend')} backend, "
                f"weights in {gb.get('quantization') or 'float32'}{key}."]


def _lineage_section(inp: ReleaseInputs, info: ReleaseInfo) -> str:
    from pipeline.release.inputs import dvc_stage_hashes

    dirty = " (built from a working tree with uncommitted changes)" if info.dirty else ""
    lines = [f"- release version: `{info.version}`; code commit: `{info.commit}`{dirty}"]
    rows = []
    for stage in inp.stages():
        rec = inp.lineage[stage]
        code = (rec.get("code") or {}).get("sha256")
        rows.append([stage, f"`{code[:12]}`" if code else MISSING, f"`{rec.get('params_digest', '')[:12]}`"])
    lines += ["", _table(["stage", "code sha256", "params digest"], rows) if rows else f"Lineage records: {MISSING}"]
    # The card is a DVC output: what differs between two runs of one commit (commits, MLflow run ids,
    # times, hosts) is not in it but in the signed manifest.json, under `runs`.
    lines += _generation_backend_lines(inp)
    lines += ["", "Commit, dirty flag, MLflow run ids, times and host of each stage of this build: "
                  "`manifest.json` in the model repo, under `runs`."]
    # the release stages' own entries change with the release (version, commit) and are rebuilt by it
    stages = {k: v for k, v in dvc_stage_hashes(inp.dvc_lock).items() if k not in RELEASE_STAGES}
    if stages:
        rows = [[name, "<br>".join(f"`{p}` md5 `{h}`" for p, h in st["outs"].items()) or "-"]
                for name, st in stages.items()]
        lines += ["", "Stage outputs recorded in `dvc.lock`:", "", _table(["stage", "outputs"], rows)]
    else:
        lines += ["", f"dvc.lock: {MISSING}"]
    return "\n".join(lines)


def _reproduce(info: ReleaseInfo, public_key: str | None = None, dataset: bool = False) -> str:
    """How to rebuild the release, install `openrelease` at its tag and audit it with a trust anchor.

    `public_key` is `publish.public_key`: the repo path of the release key committed at the tag (then the
    audit anchors on it with --repo-key), or None (then the reader must bring the publisher's key).
    """
    if info.remote:
        steps = [f"git clone {info.remote} open-release && cd open-release",
                 f"git checkout {info.version}   # the release tag"]
    else:  # no known remote: the code is in the model repo, as the git archive of the release commit
        fetch = ([f"hf download {info.model_repo} --revision {info.version} --include 'source/*' --local-dir model"
                  "   # the source archive is in the model repo"] if dataset else [])
        steps = [*fetch, f"tar xzf {'model/' if dataset else ''}source/open-release-{info.version}.tar.gz "
                 f"&& cd open-release-{info.version}",
                 "git init -q && git add -A && git commit -qm source   # DVC works inside a git repo"]
    target = f"{info.model_repo} --revision {info.version}"
    if info.remote and public_key:
        verify = [
            "```bash",
            f"git clone {info.remote} open-release && cd open-release && git checkout {info.version}",
            "python -m venv .venv && . .venv/bin/activate && pip install .   # openrelease, as of the release tag",
            f"openrelease audit {target} --repo-key",
            "```", "",
            f"`--repo-key` checks the signature against `{public_key}` as committed in the code repository at tag "
            f"`{info.version}` (read from the clone with git), not against the `signing-key.pub` inside the download.",
        ]
    else:
        install = (f'pip install "git+{info.remote}@{info.version}"   # openrelease, as of the release tag'
                   if info.remote else
                   f"tar xzf source/open-release-{info.version}.tar.gz && pip install ./open-release-{info.version}"
                   "   # openrelease, from this release's source archive")
        verify = [
            "```bash", install,
            f"openrelease audit {target} --public-key publisher.pub",
            "```", "",
            "`publisher.pub` is the publisher's public key, obtained from a channel you trust, not from this "
            "download: the copy inside it (`signing-key.pub`) cannot vouch for itself. Its sha256 must equal "
            "`signing.public_key_sha256` in `manifest.json`. No key is committed in the code repository for "
            "this release (`publish.public_key` unset), so `--repo-key` does not apply. Without an anchor the "
            "audit still checks every file and exits 3: consistent, signer not verified.",
        ]
    return "\n".join([
        "```bash", *steps, "make repro     # = dvc repro: the same stages, params and seeds", "```", "",
        "Verify what you downloaded against the signed manifest (weights, card, dataset, source archive):", "",
        *verify, "", "A downloaded folder is audited the same way: `openrelease audit FOLDER` with the same anchor "
        "(`--dataset FOLDER` for the dataset beside a model download); `openrelease report` writes the result as "
        "one offline HTML page."])


def _micro_batches(packing: bool | None) -> str:
    if packing is None:
        return MISSING
    return ("padding-free: the real tokens of each micro-batch as one row, attention per sequence (`train.packing`)"
            if packing else "padded to the longest sequence (TRL's collator)")


def _train_section(inp: ReleaseInputs) -> str:
    tp = inp.train_params()
    rec = inp.record("train") or {}
    tm = inp.metrics.get("train") or {}
    extra = rec.get("extra") or {}
    hyper = _flatten(tp)
    run_facts = extra.get("train") or {}
    plan = run_facts.get("plan") or {}
    effective = tm.get("effective_batch_size", extra.get("effective_batch_size", tp.get("global_batch_size")))
    hardware = extra.get("hardware") or tm.get("hardware") or (rec.get("platform") if rec else None)
    versions = rec.get("versions") or {}
    lines = [
        f"- effective (global) batch size: {fmt(effective)}",
        f"- hardware: {fmt(hardware)}",
        f"- precision: {fmt(plan.get('precision'))} "
        "(fp32 on CPU unless `train.precision` opts in to bf16 autocast)",
        f"- micro-batches: {_micro_batches(plan.get('packing'))}",
        "- training wall time, CPU seconds and peak memory of this build: `manifest.json`, `runs.train`",
        f"- {_resume_line(tm, run_facts.get('resume') or {})}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in versions.items()) or MISSING}",
        "", "Every training hyperparameter, as the train stage read it:", "",
        # a parameter set to null is a choice params.yaml explains (e.g. torch_threads: every core), not a gap
        _table(["parameter", "value"], [[f"`{k}`", "`null`" if v is None else v] for k, v in sorted(hyper.items())])
        if hyper else MISSING,
    ]
    if tm:
        lines += ["", "Training metrics (`metrics/train.json`):", "", _numbers_table(tm, "training metrics")]
    return "\n".join(lines)


def _resume_line(tm: dict[str, Any], resume: dict[str, Any]) -> str:
    """Whether the run resumed from a checkpoint: the numbers above then cover the whole run."""
    if not tm and not resume:
        return f"resumed: {MISSING}"
    steps = tm.get("steps", resume.get("steps_total"))
    if tm.get("resumed") or resume.get("resumed"):
        frm = tm.get("resumed_from_step", resume.get("resumed_from_step"))
        return (f"resumed: yes, from the checkpoint at step {fmt(frm)} of {fmt(steps)}; loss and steps are the "
                "whole run's, restored from the checkpoint's trainer state")
    why = resume.get("restart_reason")
    return f"resumed: no ({fmt(steps)} steps in one run{'; ' + why if why else ''})"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _judge(inp: ReleaseInputs) -> str:
    ev = (inp.record("evaluate") or {}).get("params", {}).get("evaluate") or inp.params.section_dump("evaluate") or {}
    judge = ev.get("judge") if isinstance(ev, dict) else None
    if not judge:
        return f"Judge: {MISSING}"
    if isinstance(judge, dict):  # never print a key, even if someone put one in params
        judge = {k: v for k, v in judge.items() if "key" not in k.lower() or k.lower().endswith("_env")}
    return "Judge configuration (from the evaluate stage's params):\n\n```json\n" + \
        json.dumps(judge, indent=2, sort_keys=True, ensure_ascii=False) + "\n```"


def _plots(inp: ReleaseInputs) -> str:
    if not inp.plots:
        return f"Plots: {MISSING}"
    base = inp.root / inp.params.paths.plots
    return "\n\n".join(f"![{p.stem}](plots/{p.relative_to(base).as_posix()})" for p in inp.plots)


def _sweep_section(inp: ReleaseInputs) -> str:
    from pipeline.release.sweep_release import card_section, load_table

    return card_section(load_table(inp.root, inp.params.paths.reports))


def copy_plots(inp: ReleaseInputs, dest: Path) -> None:
    base = inp.root / inp.params.paths.plots
    for p in inp.plots:
        target = dest / "plots" / p.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)


def render_template(name: str, fields: dict[str, str]) -> str:
    """A card body from `templates/<name>`: the prose lives there, the computed sections come from here."""
    text = (Path(__file__).parent / "templates" / name).read_text(encoding="utf-8")
    return "\n" + text.format_map(fields)


def _saved_dtype(inp: ReleaseInputs) -> str | None:
    """The dtype the released weights are saved in, from their config.json (what users download)."""
    from pipeline.core.io import config_dtype_name

    if inp.model_dir is None:
        return None
    cfg = inp.model_dir / "config.json"
    try:
        return config_dtype_name(json.loads(cfg.read_text(encoding="utf-8"))) if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def model_card(inp: ReleaseInputs, info: ReleaseInfo, lic: LicenseDecision):
    from huggingface_hub import ModelCard, ModelCardData

    cp = inp.params.card
    bm = inp.params.base_model
    base_id = bm.hub.repo_id if bm.hub is not None else bm.name
    name = info.model_repo.split("/")[-1]
    data = ModelCardData(
        model_name=name, base_model=base_id, datasets=[info.dataset_repo], language=cp.language,
        library_name="transformers", pipeline_tag="text-generation", tags=[*cp.tags, "dpo", "open-release"],
        eval_results=model_index_results(inp.metrics.get("eval"), info) or None,
        # merged weights of the base architecture (the LoRA adapter rides along in adapter/)
        base_model_relation="finetune",
        **hub_metadata(lic.release),
    )
    splits = ", ".join(f"{s}: {n} pairs" for s, n in inp.splits.items()) or MISSING
    body = render_template("model_card.md", {
        "name": name, "base_name": bm.name, "base_license": bm.license, "base_source": bm.source,
        "version": info.version, "dataset_repo": info.dataset_repo, "endpoint": info.endpoint, "splits": splits,
        "intended_use": _bullets(cp.intended_use), "out_of_scope": _bullets(cp.out_of_scope),
        "sources": _sources_table(inp), "build_counts": _numbers_table(inp.metrics.get("data"), "build counts"),
        "decontamination": _numbers_table(inp.report("decontamination"), "decontamination report"),
        "training": _train_section(inp), "evaluation": "<details>\n<summary>Every evaluation metric (click to open)</summary>\n\n"
        + eval_table(inp.metrics.get("eval")) + "\n\n</details>\n\n" + evaluation_notes(inp),
        "summary": results_summary(inp.metrics.get("eval") or {}, (inp.metrics.get("eval") or {}).get("n_test_prompts"),
                                   _saved_dtype(inp)),
        "quick_start": quick_start(info, base_id, bm.hub.revision if bm.hub is not None else None),
        "citations": CITATIONS,
        "judge": _judge(inp),
        "judge_weaknesses": _bullets(cp.judge_weaknesses), "plots": _plots(inp), "limitations": _bullets(cp.limitations),
        "license": _license_section(lic, "model"), "lineage": _lineage_section(inp, info), "reproduce": _reproduce(info, inp.params.publish.public_key),
        "sweep": _sweep_section(inp) + rounds_section(inp), "removals": model_section(removals(inp)),
    })
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def dataset_card(inp: ReleaseInputs, info: ReleaseInfo, lic: LicenseDecision):
    from huggingface_hub import DatasetCard, DatasetCardData

    cp = inp.params.card
    total = sum(inp.splits.values())
    size = "n<1K" if total < 1000 else "1K<n<10K" if total < 10_000 else "10K<n<100K" if total < 100_000 else "100K<n<1M"
    data = DatasetCardData(
        pretty_name=f"{info.dataset_repo.split('/')[-1]} preference pairs", language=cp.language,
        task_categories=["text-generation"], size_categories=[size], tags=[*cp.tags, "dpo", "preference", "open-release"],
        configs=dataset_configs(inp),
        **hub_metadata(lic.dataset),
    )
    from pipeline.release import dataset_card as dc

    validation = inp.report("validation")
    body = render_template("dataset_card.md", {
        "name": info.dataset_repo.split("/")[-1], "model_repo": info.model_repo, "endpoint": info.endpoint,
        "version": info.version, "dataset_repo": info.dataset_repo, "origin": dc.origin(inp),
        "configs": dc.configs_section(inp, data.configs), "split_rules": dc.splits_section(inp),
        "cuts": dc.cut_section(inp), "eval_answers": dc.eval_answers_section(inp, info.dataset_repo, info.version),
        # audit re-renders this table from the Parquet files: keep its shape
        "splits": _table(["split", "pairs"], [[s, n] for s, n in inp.splits.items()]) if inp.splits else MISSING,
        "columns": ", ".join(f"`{c}`" for c in inp.dataset_columns) or MISSING,
        "build_counts": _numbers_table(inp.metrics.get("data"), "build counts"),
        "decontamination": _numbers_table(inp.report("decontamination"), "decontamination report"),
        "validation": _numbers_table(validation, "validation report"), "license": _license_section(lic, "dataset"),
        "lineage": _lineage_section(inp, info),
        "reproduce": _reproduce(info, inp.params.publish.public_key, dataset=True),
        "removals": dataset_section(removals(inp)),
    })
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_cards(inp: ReleaseInputs, info: ReleaseInfo, lic: LicenseDecision, model_dir: Path, dataset_dir: Path) -> None:
    """Write README.md (and the plots it shows) into the model and dataset repo folders."""
    from pipeline.core.io import atomic_write_text

    model_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    copy_plots(inp, model_dir)
    from pipeline.release.hub_results import write_eval_results

    write_eval_results(inp.metrics.get("eval"), info, model_dir)
    atomic_write_text(model_dir / "README.md", str(model_card(inp, info, lic)))
    atomic_write_text(dataset_dir / "README.md", str(dataset_card(inp, info, lic)))
