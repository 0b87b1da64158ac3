"""Two rounds of iterative on-policy DPO with `dvc repro`, on the tiny config, in a temporary git repo.

Round 2's samples come from round 1's trained model (its lineage names that model by sha256, and
`dvc dag` draws the chain); changing round 2's own params entry leaves every round-1 stage alone; the
dry-run release ships round 2 and audits clean, its manifest listing both rounds.
In the default suite: 184 s to 245 s wall in three runs on 2 cores shared with other jobs (load average 2 to 4),
21 stages in all (round 1 alone is the one-round e2e test's pipeline part).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.lineage import sha256_path
from tests.conftest import shared_data
from tests.helpers import configure_tiny, dvc, edit_params, env_for, git, make_project_copy

ROUND1 = ["base_model", "generate", "rate", "ingest", "validate", "build", "train", "evaluate"]
ROUND2 = ["generate", "rate", "ingest", "validate", "build", "train", "evaluate"]
BIN = Path(sys.executable).parent


def _openrelease(project: Path, *args: str):
    return subprocess.run([str(BIN / "openrelease"), *args], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=900)


def _read(project: Path, rel: str):
    return json.loads((project / rel).read_text())


def test_two_rounds_chain_rerun_and_audit(tiny_model_dir, tmp_path):
    project = make_project_copy(tmp_path / "proj")
    configure_tiny(project, tiny_model_dir, shared_data("llama-factory", "dpo_en_demo.json"))
    # smaller than the one-round test's sets: this test runs the evaluation twice
    for rel, src, n in (("data/ifeval/tiny.jsonl", "data/ifeval/input_subset.jsonl", 4),
                        ("data/judge/tiny_pairs.jsonl", "data/judge/human_pairs.jsonl", 4)):
        (project / rel).write_text("".join((project / src).read_text().splitlines(keepends=True)[:n]))
    edit_params(project, paths={"ifeval_prompts": "data/ifeval/tiny.jsonl", "judge_labels": "data/judge/tiny_pairs.jsonl"})
    git(project, "add", "data")
    made = _openrelease(project, "rounds", "--count", "2", "--write")
    assert made.returncode == 0, made.stderr
    # a random tiny model's own samples may make no pair: round 2 keeps round 1's train pairs too
    # and ships the last round whatever the selection rule would say of a random model's answers: this
    # test follows the chain into the released round 2
    edit_params(project, rounds={"data": "accumulate", "publish": "last"})
    git(project, "commit", "-qam", "tiny config, two rounds")

    result = dvc(project, "repro", "publish", timeout=2400)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-4000:])
    check_two_rounds(project)


def check_two_rounds(project: Path) -> None:
    """Everything the test asserts after `dvc repro publish` (callable on a kept project folder)."""
    # round 2 sampled with round 1's model, named by sha256 in its generation record
    train1, gen2 = _read(project, "lineage/train.json"), _read(project, "lineage/generate.r2.json")
    model1 = next(a for a in train1["outputs"] if a["path"] == "models/trained")
    assert model1["sha256"] == sha256_path(project / "models" / "trained")
    assert gen2["extra"]["round"]["previous_model"] == {"round": "r1", "path": "models/trained", "sha256": model1["sha256"]}
    assert {"path": "models/trained", "sha256": model1["sha256"]}.items() <= next(
        a for a in gen2["inputs"] if a["path"] == "models/trained").items()
    rows = [json.loads(x) for x in (project / "outputs/rounds/r2/generations.jsonl").read_text().splitlines()]
    assert rows and {r["generator"] for r in rows} == {"tiny-llama + DPO r1"}  # round 1's policy
    assert gen2["params"]["generate"] == _read(project, "lineage/generate.json")["params"]["generate"]  # same decoding
    train2 = _read(project, "lineage/train.r2.json")
    assert train2["extra"]["round"]["paths"]["base_model"] == "models/trained"  # start_from previous
    # round 2's caches are keyed by round 2's models: the reference pass by round 1's policy (its reference),
    # the evaluation by round 2's policy, never by the base model round 1 used
    from safetensors import safe_open

    base_sha = next(a for a in train1["inputs"] if a["path"] == "models/base")["sha256"]
    model2 = next(a for a in train2["outputs"] if a["path"] == "outputs/rounds/r2/model")["sha256"]
    ref_keys = []
    for f in sorted((project / "outputs/rounds/r2/ref_logps").rglob("*.safetensors")):
        with safe_open(f, "pt") as st:
            ref_keys.append(st.metadata()["key"])
    assert ref_keys and all(model1["sha256"] in k and base_sha not in k for k in ref_keys)
    eval_keys = [json.loads(f.read_text())["key"] for f in (project / "outputs/rounds/r2/eval_cache").rglob("*.json")]
    assert any(model2 in json.dumps(k) for k in eval_keys)
    assert not any(model1["sha256"] in json.dumps(k) for k in eval_keys)  # round 1's policy is not evaluated here
    dag = dvc(project, "dag", "generate_round@r2")
    assert dag.returncode == 0 and "train" in dag.stdout and "base_model" in dag.stdout, dag.stdout

    summary = _read(project, "reports/rounds/r2/summary.json")
    assert [r["round"] for r in summary["rounds"]] == ["r1", "r2"] and summary["published"] == "r2"
    r1, r2 = summary["rounds"]
    assert r2["sampled_by_sha256"] == r1["model_sha256"] == model1["sha256"]
    assert r2["vs_previous"] and "pass_rate_vs_previous" in r2["vs_previous"]
    for key in ("pass_rate_policy", "pass_rate_delta", "test_degenerate_rate_policy", "kl", "length_policy"):
        assert key in r2["metrics"], key
    card = (project / "outputs/cards/model/README.md").read_text()
    assert "## DPO rounds" in card and "| r2 (released) |" in card and "rounds/r2/rounds.png" in card

    # the dry-run release ships round 2, lists both rounds, and audits clean with the chain in its tree
    manifest = _read(project, "release/model/manifest.json")
    assert [r["round"] for r in manifest["rounds"]["rounds"]] == ["r1", "r2"]
    weights = next(f for f in manifest["files"]["model"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == sha256_path(project / "outputs/rounds/r2/model/model.safetensors")
    assert manifest["lineage"]["train"]["stage"] == "train.r2" and manifest["lineage"]["train.r1"]["stage"] == "train"
    audit = _openrelease(project, "audit", "release", "--public-key", ".openrelease/keys/signing-key.pub")
    assert audit.returncode == 0, (audit.stdout[-4000:], audit.stderr[-3000:])
    assert "train.r1" in audit.stdout and "base_model" in audit.stdout and "generate" in audit.stdout
    status = dvc(project, "status")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout

    # a change to round 2's own entry reruns round 2 (and the release), never a round-1 stage
    prompts = (project / "data/prompts/train.jsonl").read_text().splitlines(keepends=True)
    (project / "data/prompts/train_r2.jsonl").write_text("".join(prompts[:4]))
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["rounds"]["later"]["r2"]["prompts"] = "data/prompts/train_r2.jsonl"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dry = dvc(project, "repro", "--dry", "publish")
    assert dry.returncode == 0, dry.stderr[-2000:]
    would_run = set(re.findall(r"Running stage '([^']+)'", dry.stdout))
    assert "generate_round@r2" in would_run and not would_run & set(ROUND1), would_run
    assert would_run <= {f"{s}_round@r2" for s in ROUND2} | {"rounds_report@r2", "card", "publish"}, would_run
