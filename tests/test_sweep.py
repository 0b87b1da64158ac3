"""The sweep: params validation, members, statistics (known answers), selection, report, audit check."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.lineage import sha256_file
from pipeline.core.params import SelectionRule, SweepParams, parse_params
from pipeline.core.selection import select
from pipeline.release import sweep_release
from pipeline.sweep import report, stats
from pipeline.sweep.members import configs, expand, format_value

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(**sweep) -> dict:
    raw = copy.deepcopy(RAW)
    for k, v in sweep.items():
        if k == "selection":
            raw["sweep"][k].update(v)
        else:
            raw["sweep"][k] = v
    return raw


def test_default_sweep_params_load():
    p = parse_params(copy.deepcopy(RAW))
    assert p.sweep.axes == {"train.dpo.beta": [0.05, 0.1]} and p.sweep.seeds == [42, 43, 44]


@pytest.mark.parametrize(("sweep", "needle"), [
    ({"axes": {"train.dpo.betta": [0.1]}}, "sweep.axes.train.dpo.betta: train.dpo.betta is not a key"),
    ({"axes": {"train.per_device_batch_size": [2, 0]}}, "train.per_device_batch_size = 0 is not valid"),
    ({"axes": {"train.lora.r": [8, 8]}}, "values repeat"),
    ({"axes": {}}, "at least one axis"),
    ({"axes": {"paths.model": ["a", "b"]}}, "paths are not a hyperparameter"),
    ({"axes": {"train.dpo.seed": [1, 2]}}, "is the seed key"),
    ({"seed_key": "train.dpo.sed"}, "sweep.seeds: train.dpo.sed is not a key"),
    ({"seeds": [1, 1]}, "seeds repeat"),
    ({"jobs": 0}, "sweep.jobs = 0"),
    ({"selection": {"constraints": ["length_ratio => 0.8"]}}, "'length_ratio => 0.8' is not '<metric> <op> <number>'"),
    ({"selection": {"tie_break": ["kl lowest"]}}, "'kl lowest' is not '<metric> min'"),
    ({"selection": {"goal": "maximize"}}, "sweep.selection.goal = 'maximize'"),
    ({"selection": {"metric": "pass rate"}}, "is not a metric name"),
    # dev prompts choose, test prompts report: the rule never reads a test metric
    ({"selection": {"metric": "pass_rate_delta"}}, "sweep.selection.metric = 'pass_rate_delta': 'pass_rate_delta' is "
                                                   "measured on the test prompts; the rule's objective must be a dev_*"),
    ({"selection": {"constraints": ["pass_rate_policy >= 0.5"]}}, "'pass_rate_policy >= 0.5': 'pass_rate_policy' is "
                                                                 "measured on the test prompts; the rule's constraint"),
    ({"selection": {"tie_break": ["win_rate max"]}}, "'win_rate max': 'win_rate' is measured on the test prompts"),
    ({"headline": ["dev_pass_rate_delta"]}, "'dev_pass_rate_delta' is a dev-set metric: the headline reports test"),
])
def test_bad_sweep_params_name_key_and_value(sweep, needle):
    with pytest.raises(ParamsError) as e:
        parse_params(_with(**sweep))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_members_grid_order_names_and_commands():
    sw = SweepParams.model_validate({**RAW["sweep"], "axes": {"train.dpo.beta": [0.05, 0.1],
                                                              "train.dpo.loss_type": [["sigmoid"], ["ipo"]]},
                                     "seeds": [42, 43]})
    members = expand(sw)
    assert len(members) == 8 and len(configs(sw)) == 4
    assert [m.config_index for m in members] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert members[0].name.endswith("-beta0.05-loss_typesigmoid-s42")
    assert expand(sw)[3].name == members[3].name  # deterministic
    assert members[3].command_line("train.dpo.seed", queue=True) == (
        f"dvc exp run --queue -n {members[3].name} -S train.dpo.beta=0.05 -S 'train.dpo.loss_type=[ipo]' "
        "-S train.dpo.seed=43 evaluate")
    assert format_value({"a": [1, None, True]}) == "{a:[1,null,true]}"


def test_combine_known_answer():
    # k=3 seeds 0.1, 0.2, 0.3: s = 0.1, a = 0.01/3; prompt se 0.05 each: b = 0.0025
    est = stats.combine([0.1, 0.2, 0.3], [0.05, 0.05, 0.05])
    a, b = 0.01 / 3, 0.0025
    df = (a + b) ** 2 * 2 / a**2
    from scipy import stats as st

    half = st.t.ppf(0.975, df) * (a + b) ** 0.5
    assert est["mean"] == pytest.approx(0.2) and est["std"] == pytest.approx(0.1)
    assert est["ci_low"] == pytest.approx(0.2 - half) and est["ci_high"] == pytest.approx(0.2 + half)
    one = stats.combine([0.4], [0.05])  # one seed: the prompt interval alone
    assert one["std"] is None and one["ci_high"] - 0.4 == pytest.approx(1.959964 * 0.05, rel=1e-5)


def test_combined_interval_covers_a_known_mean():
    # Synthetic sweeps with seed sd 0.05 and a prompt error of sd 0.03 SHARED by the seeds (same eval
    # prompts): x_i = mu + seed_i + e. The interval must cover mu about 95% of the time; the seed-only
    # t-interval must not (it misses the shared prompt error).
    rng = random.Random(0)
    mu, hits, naive_hits, n = 0.3, 0, 0, 2000
    from scipy import stats as st

    for _ in range(n):
        e = rng.gauss(0, 0.03)
        xs = [mu + rng.gauss(0, 0.05) + e for _ in range(3)]
        est = stats.combine(xs, [0.03] * 3)
        hits += est["ci_low"] <= mu <= est["ci_high"]
        m, s = sum(xs) / 3, (sum((x - sum(xs) / 3) ** 2 for x in xs) / 2) ** 0.5
        naive_hits += abs(m - mu) <= st.t.ppf(0.975, 2) * s / 3**0.5
    assert 0.93 <= hits / n <= 0.995, hits / n
    assert naive_hits / n < hits / n


def test_holm_known_values_and_an_undefined_p_still_counts():
    assert stats.holm([0.01, 0.04, 0.03]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06)]
    assert stats.holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]
    # a configuration whose p-value is undefined was still tried: m = 4, and it counts as p = 1
    assert stats.holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.04), pytest.approx(0.09), pytest.approx(0.09), 1.0]
    assert stats.holm([0.01, float("nan")]) == [pytest.approx(0.02), 1.0]


def test_degenerate_intervals_are_nan_never_certainty():
    # a member whose prompt interval is undefined (NaN bounds): the combined interval is undefined too,
    # and so is the p-value built on it
    est = stats.combine([0.1, 0.2, 0.3], [0.05, float("nan"), 0.05])
    assert est["mean"] == pytest.approx(0.2) and est["std"] == pytest.approx(0.1)
    assert math.isnan(est["ci_low"]) and math.isnan(est["ci_high"]) and est["se"] is None
    assert stats.p_better(est, 0.0, "maximise") is None
    assert stats.prompt_se({"x": 0.1, "x_ci_low": 0.1, "x_ci_high": 0.1}, "x") != 0.0  # zero width is not se 0
    assert math.isnan(stats.prompt_se({"x": 0.1, "x_ci_low": 0.1, "x_ci_high": 0.1}, "x"))
    assert stats.prompt_se({"kl": 0.1}, "kl") is None  # no interval keys: seed spread only
    same = stats.combine([0.2, 0.2, 0.2], [None, None, None])  # identical seeds, no prompt interval
    assert math.isnan(same["ci_low"]) and math.isnan(same["ci_high"])
    # the card shows an undefined interval as NaN, not as certainty
    assert sweep_release._f(float("nan")) == "NaN" and sweep_release._f(None) == "n/a"


def test_holm_family_counts_a_configuration_whose_interval_is_degenerate():
    # three configurations; the middle one's dev interval is degenerate (NaN bounds), so its p is undefined.
    # It was tried: the winner's Holm adjustment must multiply by 3, not 2.
    rows = _members({0: 0.05, 1: 0.0, 2: 0.2}, betas=(0.05, 0.1, 0.2), degenerate=frozenset({1}))
    sw = SweepParams.model_validate({**RAW["sweep"], "axes": {"train.dpo.beta": [0.05, 0.1, 0.2]}})
    table = report.build_table(sw, "abcd1234", rows, 3)
    mid, w = table["configs"][1], table["winner"]
    assert mid["p_vs_base"] is None and mid["p_vs_base_holm"] == 1.0
    assert math.isnan(mid["ci_low"]["dev_pass_rate_delta"]) and math.isnan(mid["ci_high"]["dev_pass_rate_delta"])
    assert w["config_index"] == 2 and w["configs_tried"] == 3
    p = [c["p_vs_base"] for c in table["configs"]]
    assert w["p_vs_base_holm"] == pytest.approx(min(1.0, 3 * min(p[0], p[2])))
    assert w["bonferroni_level"] == pytest.approx(1 - 0.05 / 3)
    assert "| beta=0.1 | 0.010 ± 0.010 |" in sweep_release.card_section(table)


def _rule(**kw) -> SelectionRule:
    return SelectionRule.model_validate({"metric": "dev_score", "goal": "maximise", "null_value": 0.0, **kw})


def _conf(score, ratio=1.0, kl=0.1):
    return {"config": {}, "mean": {"dev_score": score, "length_ratio": ratio, "kl": kl}}


def test_selection_rule_constraints_goal_and_tie_break():
    rows = [_conf(0.5, ratio=0.7), _conf(0.4), _conf(0.4, kl=0.05), _conf(float("nan"))]
    assert select(_rule(constraints=["length_ratio >= 0.8"]), rows)[0] == 1  # best breaks the constraint
    assert select(_rule(constraints=["length_ratio >= 0.8"], tie_break=["kl min"]), rows)[0] == 2
    assert select(_rule(), rows)[0] == 0
    assert select(_rule(goal="minimise"), rows)[0] == 1
    assert select(_rule(constraints=["kl <= 0.01"]), rows)[0] is None
    with pytest.raises(ParamsError, match="metric 'dev_nope' is not in the sweep table"):
        select(_rule(constraints=["dev_nope > 1"]), rows)


def _members(effect: dict[int, float], betas=(0.05, 0.1), degenerate: frozenset[int] = frozenset()) -> list[dict]:
    """Member rows as `openrelease sweep` collects them: dev metrics (the rule's) beside test metrics (the
    card's). A configuration in `degenerate` has NaN dev interval bounds, as pipeline/eval/stats.py now
    reports an interval over prompts that show no variability."""
    rows = []
    for ci, beta in enumerate(betas):
        for si, seed in enumerate([42, 43, 44]):
            d = effect[ci] + 0.01 * si
            lo, hi = (float("nan"), float("nan")) if ci in degenerate else (d - 0.05, d + 0.05)
            rows.append({"name": f"m{ci}{seed}", "dvc_exp": f"m{ci}{seed}", "index": len(rows), "config_index": ci,
                         "config": {"train.dpo.beta": beta}, "seed": seed, "mlflow_run_id": f"run{ci}{seed}",
                         "metrics": {"dev_pass_rate_delta": d, "dev_pass_rate_delta_ci_low": lo,
                                     "dev_pass_rate_delta_ci_high": hi,
                                     "pass_rate_delta": d - 0.02, "pass_rate_delta_ci_low": d - 0.08,
                                     "pass_rate_delta_ci_high": d + 0.04, "length_ratio": 1.1, "kl": 0.1 + ci,
                                     "pref_accuracy": 0.6, "win_rate": 0.5, "dev_degenerate_rate_delta": -0.1},
                         "train": {"ref_logps_cache_hit": 0.0 if not rows else 1.0}})
    return rows


def _sweep() -> SweepParams:
    return parse_params(copy.deepcopy(RAW)).sweep


def test_table_report_files_and_byte_stable_plots(tmp_path):
    table = report.build_table(_sweep(), "abcd1234", _members({0: 0.05, 1: 0.2}), 2)
    w = table["winner"]
    assert w["config"] == {"train.dpo.beta": 0.1} and w["release_seed"] == 42 and w["release_member"] == "m142"
    assert table["reference_passes"] == 1 and w["configs_tried"] == 2
    assert w["p_vs_base_holm"] >= w["p_vs_base"]
    assert w["metric"] == "dev_pass_rate_delta" and w["selected_on"] == "dev"
    c = table["configs"][1]
    assert c["mean"]["dev_pass_rate_delta"] == pytest.approx(0.21) and c["std"]["dev_pass_rate_delta"] == pytest.approx(0.01)
    assert c["mean"]["pass_rate_delta"] == pytest.approx(0.19)  # the test metric, reported beside it
    files = report.write(table, tmp_path / "r", tmp_path / "p", tmp_path / "sweep.json", 12.0)
    png = tmp_path / "r" / "pass_rate_delta_vs_beta.png"
    assert png in files and (tmp_path / "p" / "pass_rate_delta.csv").is_file()
    first = png.read_bytes()
    report.write(table, tmp_path / "r", tmp_path / "p", tmp_path / "sweep.json", 12.0)
    assert png.read_bytes() == first
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["winner_pass_rate_delta_std"] == pytest.approx(0.01) and summary["reference_passes"] == 1
    section = sweep_release.card_section(table)
    assert "Holm-adjusted" in section and "run142" in section and "`m042`" in section
    assert "seed std" in section and "length_ratio <= 2.0" in section
    # chosen on dev, the pick reported on test with its seed spread
    assert "`dev_pass_rate_delta`, measured on the **dev** prompts" in section
    assert "The pick on the **test** prompts" in section
    assert "| pass_rate_delta | 0.190 ± 0.010 |" in section


def _release(tmp_path: Path, released_beta: float, seed: int = 42) -> tuple[dict, Path]:
    table = report.build_table(_sweep(), "abcd1234", _members({0: 0.05, 1: 0.2}), 2)
    src = tmp_path / "root"
    report.write(table, src / "reports" / "sweep", src / "plots" / "sweep", src / "metrics" / "sweep.json", None)
    model = tmp_path / "bundle" / "model"
    entry = sweep_release.copy_into(src, "reports", model)
    manifest = {"sweep": entry, "params": {"sweep": copy.deepcopy(RAW["sweep"])},
                "lineage": {"train": {"params": {"train": {"dpo": {"beta": released_beta, "seed": seed}}}}}}
    return manifest, model


def test_audit_sweep_check_passes_on_the_rules_pick(tmp_path):
    manifest, model = _release(tmp_path, 0.1)
    problems, notes = sweep_release.check(manifest, model)
    assert problems == [] and "picks configuration 1 of 2" in notes[0]
    assert "mean and seed std recomputed from its 3 member rows" in notes[0]


@pytest.mark.parametrize(("beta", "seed", "needle"), [
    (0.05, 42, "train.dpo.beta = 0.05 (the rule's pick has 0.1)"),
    (0.1, 43, "train.dpo.seed = 43 (the rule's pick has 42)"),
])
def test_audit_sweep_check_fails_when_released_config_is_not_the_pick(tmp_path, beta, seed, needle):
    manifest, model = _release(tmp_path, beta, seed)
    problems, _ = sweep_release.check(manifest, model)
    assert any(needle in p for p in problems), problems


def test_audit_sweep_check_fails_on_an_edited_table(tmp_path):
    manifest, model = _release(tmp_path, 0.1)
    table = json.loads((model / "sweep" / "table.json").read_text())
    table["configs"][0]["mean"]["dev_pass_rate_delta"] = 0.9  # make the other configuration look best
    (model / "sweep" / "table.json").write_text(json.dumps(table))
    assert "does not match the sha256" in sweep_release.check(manifest, model)[0][0]
    manifest["sweep"]["sha256"] = sha256_file(model / "sweep" / "table.json")  # a forger re-hashes it
    problems, _ = sweep_release.check(manifest, model)
    assert any("the rule picks 0" in p for p in problems) and any("train.dpo.beta" in p for p in problems)
    assert "configuration 0 ({\"train.dpo.beta\": 0.05}): `dev_pass_rate_delta` mean 0.9 in the table, " \
           "0.06 from its member rows" in problems[0]


def test_no_sweep_is_said_on_the_card():
    assert "one training run with one seed" in sweep_release.card_section(None)


def test_sweep_refuses_interpolations_dvc_set_param_would_resolve(tmp_path):
    from pipeline.sweep.run import SweepError, check_no_interpolation

    check_no_interpolation(ROOT / "params.yaml")  # the shipped params are sweepable
    bad = tmp_path / "params.yaml"
    bad.write_text("a: 1  # ${ok in a comment}\ndata:\n  path: ${paths.rated}\n")
    with pytest.raises(SweepError, match=r"params.yaml:3: 'path: \$\{paths.rated\}'"):
        check_no_interpolation(bad)


def test_dvc_set_param_rewrite_changes_only_the_members_keys(tmp_path):
    # What `dvc exp run -S` does to params.yaml (DVC's own function): the result must load, and differ from
    # the workspace's params only in the member's keys, or upstream stages would rerun in every member.
    import shutil

    from dvc.utils.hydra import apply_overrides

    from pipeline.core.params import load_params

    base = load_params(ROOT / "params.yaml")
    member = expand(base.sweep)[-1]
    copy_ = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy_)
    apply_overrides(copy_, [a for a in member.command(base.sweep.seed_key)[5:-1] if a != "-S"])
    ran = load_params(copy_)
    assert ran.train.dpo["beta"] == member.config["train.dpo.beta"] and ran.train.dpo["seed"] == member.seed
    want = base.model_dump(mode="json", by_alias=True)
    want["train"]["dpo"].update(beta=ran.train.dpo["beta"], seed=member.seed)
    assert ran.model_dump(mode="json", by_alias=True) == want


def test_members_share_the_main_workspace_caches(tmp_path, monkeypatch):
    """Inside a DVC experiment workspace (DVC_ROOT names the main one) the content-keyed caches are the
    main workspace's; the member's own folder still exists for DVC; an explicit variable wins."""
    from pipeline.core.shared import ENV_EVAL_CACHE_DIR, ENV_REF_LOGPS_DIR, shared_cache_dir

    main, member = tmp_path / "main", tmp_path / "main" / ".dvc" / "tmp" / "exps" / "x"
    member.mkdir(parents=True)
    for var in ("DVC_ROOT", ENV_EVAL_CACHE_DIR, ENV_REF_LOGPS_DIR):
        monkeypatch.delenv(var, raising=False)
    assert shared_cache_dir(main, "outputs/eval_cache", env=ENV_EVAL_CACHE_DIR) == main / "outputs/eval_cache"
    monkeypatch.setenv("DVC_ROOT", str(main))
    assert shared_cache_dir(member, "outputs/eval_cache", env=ENV_EVAL_CACHE_DIR) == main / "outputs/eval_cache"
    assert (member / "outputs/eval_cache").is_dir()
    monkeypatch.setenv(ENV_EVAL_CACHE_DIR, str(tmp_path / "nfs"))
    assert shared_cache_dir(member, "outputs/eval_cache", env=ENV_EVAL_CACHE_DIR) == tmp_path / "nfs"
    assert shared_cache_dir(member, "outputs/ref_logps") == main / "outputs/ref_logps"  # the other variable


def test_copy_paths_skip_what_git_already_put_in_the_member_workspace(tmp_path):
    """`dvc exp run -C metrics` fails with "File exists" when metrics/ holds a tracked file: such a folder
    is passed as its untracked entries instead."""
    import subprocess

    from pipeline.core.params import load_params
    from pipeline.sweep.run import copy_paths

    for rel in ("metrics/.gitignore", "metrics/data.json", "metrics/sub/x.json", "lineage/train.json",
                "reports/validation/index.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "metrics/.gitignore"], cwd=tmp_path, check=True)
    params = load_params(ROOT / "params.yaml")
    assert copy_paths(params, tmp_path) == ("lineage", "reports", "metrics/data.json", "metrics/sub")


def test_reference_passes_come_from_the_train_runs_in_mlflow(tmp_path, monkeypatch):
    """ref_logps_cache_hit is a run fact (MLflow), not in metrics/train.json: the sweep reads each
    member's train child run, the newest when a member ran twice."""
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking.default_tracking_uri(tmp_path))
    exp = client.create_experiment("e")
    parents = {}
    for name, hits in (("m1", [0.0]), ("m2", [0.0, 1.0])):  # m2's newest train run hit the cache
        parents[name] = client.create_run(exp, tags={tracking.TAG_DVC_EXP: name}).info.run_id
        for hit in hits:
            child = client.create_run(exp, tags={tracking.TAG_STAGE: "train", "mlflow.parentRunId": parents[name]})
            client.log_metric(child.info.run_id, "ref_logps_cache_hit", hit)
            time.sleep(0.01)
    other = client.create_run(exp, tags={tracking.TAG_STAGE: "evaluate", "mlflow.parentRunId": parents["m1"]})
    client.log_metric(other.info.run_id, "ref_logps_cache_hit", 5.0)
    got = tracking.stage_run_metrics("e", parents, "train", tmp_path)
    assert {k: v["ref_logps_cache_hit"] for k, v in got.items()} == {"m1": 0.0, "m2": 1.0}
