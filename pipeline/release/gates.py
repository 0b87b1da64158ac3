"""Release gates: each checks one thing and says in one line what is wrong.

Environment gates (a clean git tree at a version, `dvc status` clean) cannot hold inside `dvc repro`:
the tree is dirty with dvc.lock updates mid-run and DVC holds its lock. So a dry run (the default
`publish` stage, `openrelease publish --dry-run`) records them as warnings in the bundle, and a real
`openrelease publish` (or `--dry-run --strict`) enforces them. Every other gate fails a dry run too.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import GateError
from pipeline.release.gitinfo import CodeState, tag_commit
from pipeline.release.inputs import RELEASE_STAGES, ReleaseInputs
from pipeline.release.licenses import LicenseDecision

ENV_GATES = ("git-clean", "git-version", "dvc-status")
REQUIRED_STAGES = ("validate", "build", "train", "evaluate")


@dataclass
class GateResult:
    name: str
    status: str   # pass | fail | warn | skip
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<4} {self.name}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _result(name: str, problems: list[str], ok_detail: str) -> GateResult:
    return GateResult(name, "fail", "; ".join(problems)) if problems else GateResult(name, "pass", ok_detail)


def git_clean(code: CodeState) -> GateResult:
    if not code.dirty:
        return GateResult("git-clean", "pass", f"working tree clean at {code.short}")
    shown = ", ".join(ln[3:] for ln in code.dirty[:5]) + (" ..." if len(code.dirty) > 5 else "")
    return GateResult("git-clean", "fail", f"{len(code.dirty)} uncommitted change(s) ({shown}); commit them first")


def git_version(code: CodeState, root: Path) -> GateResult:
    if code.version_from == "dev":
        return GateResult("git-version", "fail", f"HEAD {code.short} has no version tag and no version was given; "
                                                 "tag it (git tag v0.1.0) or pass --version")
    at = tag_commit(root, code.version)
    if at is not None and at != code.commit:
        return GateResult("git-version", "fail", f"tag {code.version} points at {at[:12]}, not at HEAD {code.short}")
    how = "tag at HEAD" if code.version_from == "tag" or at == code.commit else "given; no such tag yet"
    return GateResult("git-version", "pass", f"version {code.version} ({how})")


def dvc_status(root: Path) -> GateResult:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                             text=True, timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GateResult("dvc-status", "fail", f"dvc status could not run: {e}")
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return GateResult("dvc-status", "fail", f"dvc status failed: {msg}")
    try:
        status = json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        return GateResult("dvc-status", "fail", f"dvc status printed no JSON: {out.stdout[:200]!r}")
    # The release's own stages are rebuilt by `openrelease publish` itself (their outputs hold the commit
    # that records them, so they can never match it), so only the stages that make the model count.
    uncached = _uncached_outs(root)
    status = {k: v for k, v in status.items() if _real_changes(v, uncached)}
    stale = sorted(k for k in status if k.split(":")[-1] not in RELEASE_STAGES)
    if not stale:
        return GateResult("dvc-status", "pass", "every stage up to evaluate is up to date with dvc.lock")
    return GateResult("dvc-status", "fail", f"{len(stale)} stage(s) out of date with dvc.lock: "
                                            f"{', '.join(stale[:8])}; run dvc repro (or dvc pull) and commit dvc.lock")


def _uncached_outs(root: Path) -> set[str]:
    """Paths of the `cache: false` outputs in dvc.yaml (checkpoints and content-keyed caches)."""
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:
        return set()
    try:
        with Repo(str(root)) as repo:
            return {Path(o.fs_path).relative_to(Path(repo.root_dir)).as_posix() for o in repo.index.outs
                    if not o.use_cache}
    except (DvcException, OSError, ValueError):
        return set()


def _real_changes(entries: Any, uncached: set[str]) -> bool:
    """A stage's `dvc status` entries without "deleted" uncached outputs: a fresh clone never has those
    (nothing can pull them) and no release reads them, so their absence leaves the stage up to date."""
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict):
            return True
        for kind, changes in entry.items():
            if kind != "changed outs" or not isinstance(changes, dict):
                return True
            if any(not (state == "deleted" and path in uncached) for path, state in changes.items()):
                return True
    return False


def _stage_diff(committed: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs in one dvc.lock stage entry: the paths whose hash changed, or the fields."""
    if not committed or not current:
        return "only in the " + ("reproduced" if current else "committed") + " dvc.lock"
    paths = []
    for kind in ("deps", "outs"):
        old = {i.get("path"): i for i in committed.get(kind) or [] if isinstance(i, dict)}
        new = {i.get("path"): i for i in current.get(kind) or [] if isinstance(i, dict)}
        paths += [f"{kind[:-1]} {p}" for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
    fields = [k for k in sorted(set(committed) | set(current)) if k not in ("deps", "outs") and
              committed.get(k) != current.get(k)]
    return ", ".join(paths + fields) or "entry differs"


def _cached_only(entry: dict[str, Any], uncached: set[str]) -> dict[str, Any]:
    """A dvc.lock stage entry without its `cache: false` outputs."""
    if not uncached or not isinstance(entry, dict) or not entry.get("outs"):
        return entry
    return {**entry, "outs": [o for o in entry["outs"] if not (isinstance(o, dict) and o.get("path") in uncached)]}


def dvc_lock_reproduced(root: Path, uncached: set[str] | None = None) -> GateResult:
    """The reproduce path of a CI release: after `dvc repro` from the tag, the dvc.lock it wrote must
    equal the committed one for every stage that makes the data and the model (the release stages
    are rebuilt by `openrelease publish` itself). Equal means the tag reproduces bit for bit.

    The `cache: false` outputs (checkpoints, the reference log-prob and evaluation caches; `uncached`,
    from dvc.yaml by default) are left out: their content depends on what the workspace computed before
    (a reused workspace keeps earlier cache entries, a fresh clone has none), and no release reads them."""
    import yaml

    from pipeline.release.gitinfo import git

    name = "dvc-lock-reproduced"
    text = git(root, "show", "HEAD:dvc.lock", check=False)
    if text is None:
        return GateResult(name, "fail", "no dvc.lock committed at HEAD to compare the reproduction with")
    lock = root / "dvc.lock"
    if not lock.is_file():
        return GateResult(name, "fail", "no dvc.lock in the working tree: run dvc repro first")
    try:
        committed = (yaml.safe_load(text) or {}).get("stages") or {}
        current = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except yaml.YAMLError as e:
        return GateResult(name, "fail", f"dvc.lock is not valid YAML: {str(e).splitlines()[0]}")
    uncached = _uncached_outs(root) if uncached is None else uncached
    committed = {s: _cached_only(e, uncached) for s, e in committed.items()}
    current = {s: _cached_only(e, uncached) for s, e in current.items()}
    stages = [s for s in sorted(set(committed) | set(current)) if s not in RELEASE_STAGES]
    differ = [f"{s} ({_stage_diff(committed.get(s) or {}, current.get(s) or {})})" for s in stages
              if committed.get(s) != current.get(s)]
    if differ:
        return GateResult(name, "fail", f"{len(differ)} stage(s) did not reproduce the committed dvc.lock: "
                                        f"{'; '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}")
    return GateResult(name, "pass", f"{len(stages)} stage(s) reproduced the committed dvc.lock exactly")


def validation(inp: ReleaseInputs) -> GateResult:
    if inp.record("validate") is None:
        return GateResult("validation", "fail", "no lineage record for the validate stage (run dvc repro validate)")
    report = inp.report("validation")
    if report is None:
        return GateResult("validation", "pass", "validate stage completed (no JSON report found in paths.reports)")
    verdict = None
    for key in ("passed", "success", "ok", "valid"):
        if isinstance(report.get(key), bool):
            verdict = report[key]
            break
    if verdict is None and isinstance(report.get("status"), str):
        verdict = report["status"].lower() in ("pass", "passed", "ok", "success", "succeeded")
    if verdict is False:
        return GateResult("validation", "fail", f"{inp.reports['validation'].name} says validation failed")
    return GateResult("validation", "pass", f"validate stage completed; {inp.reports['validation'].name} "
                                            f"{'passed' if verdict else 'has no pass/fail flag'}")


def recorded_sha(outputs: dict[str, tuple[str, dict]], path: str) -> tuple[str, str | None] | None:
    """(producing stage, sha256) of `path` as its producer recorded it: the artifact itself, or a file
    inside a folder artifact (`outputs/dataset/train.parquet` inside `outputs/dataset`)."""
    if path in outputs:
        stage, art = outputs[path]
        return stage, art["sha256"]
    for folder, (stage, art) in outputs.items():
        if path.startswith(folder.rstrip("/") + "/") and art.get("files") is not None:
            return stage, art["files"].get(path[len(folder.rstrip("/")) + 1 :])
    return None


def produced_outputs(records: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    for stage, rec in records.items():
        for art in rec.get("outputs", []):
            out[art["path"]] = (stage, art)
    return out


def lineage(inp: ReleaseInputs, published: dict[str, dict[str, str]]) -> GateResult:
    """Every stage read what its producer last wrote, and the files to publish are those train/build wrote.

    `published` maps a params path key (`model`, `dataset`) to {file relpath: sha256} of what is released.
    """
    problems = [f"no lineage record for stage {s}" for s in REQUIRED_STAGES if inp.record(s) is None]
    produced = produced_outputs({s: inp.lineage[s] for s in inp.stages()})
    for stage in inp.stages():
        for art in inp.lineage[stage].get("inputs", []):
            src = recorded_sha(produced, art["path"])
            if src and src[0] != stage and src[1] != art["sha256"]:
                problems.append(f"{stage} read {art['path']} {art['sha256'][:12]} but {src[0]} last wrote "
                                f"{str(src[1])[:12]} (stale; run dvc repro)")
    for key, files in published.items():
        rel = getattr(inp.params.paths, key)
        if rel not in produced:
            problems.append(f"no stage recorded writing {rel}")
            continue
        stage = produced[rel][0]
        for name, sha in files.items():
            if recorded_sha(produced, f"{rel}/{name}") != (stage, sha):
                problems.append(f"{rel}/{name} differs from what {stage} recorded writing (edited after the run?)")
                break
    return _result("lineage", problems, f"{len(inp.lineage)} stage records agree with each other and the files")


# Metrics that are only as good as the judge behind them.
JUDGE_METRICS = ("win_rate", "win_rate_soft", "lc_win_rate")


def judge_unreliable(metrics: dict[str, Any] | None) -> bool:
    """The evaluate stage marked its judge unreliable (order consistency below the params' threshold, or
    Cohen's kappa with people whose interval includes 0)."""
    return (metrics or {}).get("judge_reliable") == 0


def _skip_judge(metrics: dict[str, Any] | None, keys) -> tuple[list[str], str]:
    if not judge_unreliable(metrics):
        return list(keys), ""
    skipped = [k for k in keys if k.startswith(JUDGE_METRICS)]
    why = []
    if (metrics.get("judge_order_consistency") or 0) < (metrics.get("judge_min_order_consistency") or 0):
        why.append(f"judge_order_consistency {metrics.get('judge_order_consistency')} < "
                   f"{metrics.get('judge_min_order_consistency')}")
    if metrics.get("judge_human_reliable") == 0:
        why.append(f"kappa with people {metrics.get('judge_human_kappa')}, interval [{metrics.get('judge_human_kappa_ci_low')}, "
                   f"{metrics.get('judge_human_kappa_ci_high')}] includes 0 or is none")
    note = f"; skipped {', '.join(skipped)}: the judge is unreliable ({'; '.join(why)})" if skipped else ""
    return [k for k in keys if k not in skipped], note


def eval_thresholds(metrics: dict[str, Any] | None, thresholds: dict[str, Any]) -> GateResult:
    if metrics is None:
        return GateResult("eval-thresholds", "fail", "metrics/eval.json is missing (run dvc repro evaluate)")
    problems = []
    keys, note = _skip_judge(metrics, thresholds)
    for key in keys:
        bound = thresholds[key]
        v = metrics.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            problems.append(f"{key} is missing from metrics/eval.json")
        elif math.isnan(v):
            problems.append(f"{key} is NaN")
        elif bound.min is not None and v < bound.min:
            problems.append(f"{key} = {v:.4g} < min {bound.min}")
        elif bound.max is not None and v > bound.max:
            problems.append(f"{key} = {v:.4g} > max {bound.max}")
    return _result("eval-thresholds", problems, f"{len(keys)} threshold(s) hold{note}")


def trivial_floor(metrics: dict[str, Any] | None, required: bool = True) -> GateResult:
    """The headline must beat the best trivial answer (evaluate's panel: empty, echo, one fixed answer,
    the base answer repeated or cut), scored by the same code: a model that does not has shown nothing
    a constant could not."""
    if not required:
        return GateResult("trivial-floor", "skip", "publish.beat_trivial_floor is false")
    m = metrics or {}
    head, floor = m.get("pass_rate_policy"), m.get("pass_rate_floor")
    if not isinstance(floor, (int, float)) or not isinstance(head, (int, float)):
        return GateResult("trivial-floor", "fail", "pass_rate_floor or pass_rate_policy is missing from "
                          "metrics/eval.json (run dvc repro evaluate)")
    if not head > floor:
        return GateResult("trivial-floor", "fail", f"pass_rate_policy {head:.4g} does not exceed the trivial-answer "
                          f"floor {floor:.4g} (outputs/eval/panel.parquet)")
    return GateResult("trivial-floor", "pass", f"pass_rate_policy {head:.4g} > trivial-answer floor {floor:.4g}")


def regression(metrics: dict[str, Any] | None, previous: dict[str, Any] | None, name: str | None,
               tolerance: dict[str, float]) -> GateResult:
    if not name:
        return GateResult("regression", "skip", "no previous release named (publish.previous_release)")
    if previous is None:
        return GateResult("regression", "fail", f"previous release {name}: no evaluation results found")
    problems = []
    keys, note = _skip_judge(metrics, tolerance)
    for key in keys:
        tol = tolerance[key]
        cur, prev = (metrics or {}).get(key), previous.get(key)
        if not isinstance(prev, (int, float)):
            continue  # the old release did not measure it: nothing to regress from
        if not isinstance(cur, (int, float)) or math.isnan(cur):
            problems.append(f"{key} missing now (was {prev:.4g} in {name})")
        elif prev - cur > tol:
            problems.append(f"{key} = {cur:.4g} regressed from {prev:.4g} in {name} (tolerance {tol})")
    return _result("regression", problems, f"no metric dropped beyond its tolerance vs {name}{note}")


def licenses(lic: LicenseDecision, allowed: list[str]) -> GateResult:
    problems = []
    if lic.conflicts and not lic.override:
        problems.append(lic.conflicts[0] + (f" (+{len(lic.conflicts) - 1} more)" if len(lic.conflicts) > 1 else "")
                        + "; set card.license_override with a reason if this is intended")
    if allowed and lic.release.lower() not in {a.lower() for a in allowed}:
        problems.append(f"release license {lic.release} is not in publish.allowed_licenses")
    how = f"overridden to {lic.release} ({len(lic.conflicts)} conflict(s) accepted)" if lic.override else \
        f"{lic.release} (derived)"
    return _result("licenses", problems, how)


def secrets(findings: list[Any], partial: list[str]) -> GateResult:
    if findings:
        shown = "; ".join(str(f) for f in findings[:5]) + (f" (+{len(findings) - 5} more)" if len(findings) > 5 else "")
        return GateResult("secrets", "fail", f"{len(findings)} possible secret(s) in the bundle: {shown}")
    note = f"; {len(partial)} file(s) scanned only in part: " + "; ".join(partial) if partial else ""
    return GateResult("secrets", "pass", "no tokens or keys found" + note)


def signing_anchor(method: str, repo_path: str | None, committed: bytes | None, public_pem: bytes | None) -> GateResult:
    """The release can be verified against something outside it: the key committed in the repo at this
    commit (publish.public_key) must be the signing key's; keyless signing anchors itself in Sigstore."""
    if method == "sigstore":
        return GateResult("signing-anchor", "pass", "keyless Sigstore signing: audit with --identity/--issuer")
    if not repo_path:
        return GateResult("signing-anchor", "warn", "publish.public_key is not set: auditors must pin the key "
                                                    "(--public-key) to verify the signer")
    if committed is None:
        return GateResult("signing-anchor", "fail", f"publish.public_key {repo_path} is not committed at HEAD; "
                                                    "commit the signing key's public key there")
    if committed != public_pem:
        return GateResult("signing-anchor", "fail", f"{repo_path} committed at HEAD is not the signing key's public "
                                                    "key; an audit with --repo-key would refuse this release")
    return GateResult("signing-anchor", "pass", f"signing key matches {repo_path} committed at HEAD (--repo-key)")


# -- contamination -------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    # The same normalisation as the build stage's decontamination (NFKC, casefold, \w+ words).
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for v in value:
            out += [v["content"]] if isinstance(v, dict) and isinstance(v.get("content"), str) else _texts(v)
        return out
    return []


def _eval_sets(inp: ReleaseInputs) -> list[tuple[str, Path, str | None]]:
    p = inp.params.paths
    # every evaluation set the project owns (test, dev, IFEval subset, general), then the configured ones
    sets = [(key, inp.root / path, None if key == "general_prompts" else "prompt")
            for key, path in p.own_eval_sets().items()]
    data = inp.params.section_dump("data") or {}
    for d in (data.get("decontaminate_against") or []) if isinstance(data, dict) else []:
        if isinstance(d, dict) and d.get("path"):
            sets.append((str(d.get("name", d["path"])), inp.root / d["path"], d.get("field")))
    seen, out = set(), []
    for name, path, field in sets:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((name, path, field))
    return out


def _read_prompts(path: Path, field: str | None) -> list[tuple[int, str]]:
    from pipeline.core.io import iter_jsonl, read_json

    rows = read_json(path) if path.suffix == ".json" else None
    items = enumerate(rows, start=0) if isinstance(rows, list) else iter_jsonl(path)
    out = []
    for line, obj in items:
        if not isinstance(obj, dict):
            continue
        key = field or next((k for k in ("prompt", "instruction", "turns", "question", "text") if k in obj), None)
        for t in _texts(obj.get(key)) if key else []:
            out.append((line, t))
    return out


def contamination(inp: ReleaseInputs, n: int) -> GateResult:
    """Independent check that no training prompt matches an evaluation prompt (exact or a shared n-gram)."""
    import pyarrow.parquet as pq

    exact: dict[str, tuple[str, int]] = {}
    grams: dict[tuple[str, ...], tuple[str, int]] = {}
    missing = []
    for name, path, field in _eval_sets(inp):
        if not path.is_file():
            missing.append(name)
            continue
        for line, text in _read_prompts(path, field):
            w = _words(text)
            exact.setdefault(" ".join(w), (name, line))
            for i in range(len(w) - n + 1):
                grams.setdefault(tuple(w[i : i + n]), (name, line))
    hits = []
    for split, f in inp.split_files.items():
        if not split.startswith("train"):
            continue
        names = pq.read_schema(f).names
        if "prompt" not in names:
            continue
        table = pq.read_table(f, columns=[c for c in ("id", "prompt") if c in names])
        ids = table.column("id").to_pylist() if "id" in table.column_names else list(range(table.num_rows))
        for rid, prompt in zip(ids, table.column("prompt").to_pylist(), strict=True):
            turns = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"] \
                if isinstance(prompt, list) else _texts(prompt)
            for t in turns:
                w = _words(t)
                hit = exact.get(" ".join(w), None)
                kind = "exact"
                if hit is None:
                    hit = next((grams[g] for i in range(len(w) - n + 1) if (g := tuple(w[i : i + n])) in grams), None)
                    kind = f"{n}-gram"
                if hit:
                    hits.append((split, rid, hit, kind))
                    break
    if hits:
        split, rid, (name, line), kind = hits[0]
        return GateResult("contamination", "fail", f"{len(hits)} training prompt(s) overlap evaluation prompts; "
                                                   f"first: {split} id {rid} matches {name} line {line} ({kind})")
    if missing and len(missing) == len(_eval_sets(inp)):
        return GateResult("contamination", "fail", f"no evaluation prompt file found to check against ({', '.join(missing)})")
    note = f"; not found: {', '.join(missing)}" if missing else ""
    return GateResult("contamination", "pass", f"no exact or {n}-gram overlap with {len(exact)} evaluation prompts{note}")


# -- running ------------------------------------------------------------------------------------

def finalize(results: list[GateResult], dry_run: bool, strict: bool) -> list[GateResult]:
    """In a dry run (not strict) environment-gate failures become warnings."""
    if not dry_run or strict:
        return results
    return [GateResult(r.name, "warn", r.detail + " (enforced when publishing)")
            if r.status == "fail" and r.name in ENV_GATES else r for r in results]


def enforce(results: list[GateResult]) -> None:
    failed = [r for r in results if r.status == "fail"]
    if failed:
        err = GateError(f"{len(failed)} release gate(s) failed: " + " | ".join(f"{r.name}: {r.detail}" for r in failed))
        err.results = results  # the CLI prints one line per gate
        raise err
