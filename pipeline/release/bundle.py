"""Laying out a release bundle: exactly what would be uploaded, one folder per Hub repo.

```
<out>/model/    merged safetensors weights, tokenizer, config (+ adapter/), README.md (the model card),
                plots/, eval/ (metrics), source/<name>-<version>.tar.gz (git archive), bom.cdx.json,
                signing-key.pub, manifest.json, model.sig
                report.html (`openrelease report`'s page for this bundle, written before it is signed)
<out>/dataset/  README.md (the dataset card), data/<split>.parquet, reports/ (validation, decontamination,
                data_docs/<kind>/: Great Expectations Data Docs that render offline, pipeline.release.datadocs)
```
The manifest lists every other file of both folders with sha256 and size; `model.sig` signs every
file of model/ (the manifest included). The bundle is built in a temporary folder and renamed into
place only when every gate passed and it audits clean.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.lineage import sha256_file
from pipeline.core.params import Params
from pipeline.core.runs import read_run_records
from pipeline.release import gates as G
from pipeline.release.croissant import write_croissant
from pipeline.release.dataset_repo import prompt_set_split, write_eval_answers
from pipeline.release.gitinfo import CodeState, code_state, public_url, source_archive
from pipeline.release.inputs import ReleaseInputs, dvc_stage_hashes, gather
from pipeline.release.licenses import LicenseDecision, derive
from pipeline.release.manifest import (
    BOM_FILE,
    DATASET_DIR,
    MANIFEST_FILE,
    MODEL_DIR,
    ReleaseInfo,
    build_manifest,
    scrub_local_paths,
)
from pipeline.release.takedowns import removals

log = logging.getLogger(__name__)

PROJECT = "open-release"
# Params sections the release itself reads, recorded in the manifest
# (each stage's own params are in its lineage record, which the manifest carries too). `sweep` is signed
# here so the audit can hold the shipped sweep table's rule to it and to params.yaml at the release tag.
MANIFEST_PARAMS = ("paths", "base_model", "data", "card", "publish", "sweep")


@dataclass
class Bundle:
    path: Path
    info: ReleaseInfo
    manifest: dict[str, Any]
    gates: list[G.GateResult] = field(default_factory=list)


def release_info(params: Params, code: CodeState, model_repo: str | None = None, dataset_repo: str | None = None,
                 endpoint: str | None = None) -> ReleaseInfo:
    p = params.publish
    return ReleaseInfo(version=code.version, model_repo=model_repo or p.model_repo,
                       dataset_repo=dataset_repo or p.dataset_repo, endpoint=(endpoint or p.endpoint).rstrip("/"),
                       commit=code.commit, dirty=bool(code.dirty), version_from=code.version_from,
                       remote=params.card.code_repo_url or public_url(code.remote))  # never a local path


def license_decision(inp: ReleaseInputs) -> LicenseDecision:
    bm = inp.params.base_model
    override = inp.params.card.license_override
    return derive(bm.name, bm.license, inp.data_sources(), override.model_dump() if override else None)


def _model_files(src: Path, include_adapter: bool) -> list[str]:
    """The trained model folder's files without TRL's/PEFT's generated READMEs (the card replaces them)."""
    out = []
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts) or f.name == "README.md":
            continue
        if rel.parts[0] == "adapter" and not include_adapter:
            continue
        out.append(rel.as_posix())
    return out


def _copy_files(src: Path, files: list[str], dest: Path) -> None:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)


def _copy_dataset(inp: ReleaseInputs, dest: Path) -> None:
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for split, f in inp.split_files.items():
        shutil.copyfile(f, dest / "data" / f"{split}.parquet")
    for name, f in inp.side_tables.items():
        shutil.copyfile(f, dest / "data" / f"{name}.parquet")
    for name, files in inp.eval_prompt_sets().items():
        # The files byte for byte as evaluate read them (their sha256 match its lineage record), and the
        # same rows as Parquet for the config: `datasets` reads one format per repo.
        (dest / "eval" / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / "eval" / name / f.name)
        split = prompt_set_split(name)
        eval_set_parquet(files, dest / "data" / name / f"{split}.parquet")
    write_eval_answers(inp.eval_tables, dest)   # config eval_answers: both models' answers and verdicts
    (dest / "reports").mkdir(parents=True, exist_ok=True)
    for kind, f in inp.reports.items():
        shutil.copyfile(f, dest / "reports" / f"{kind}.json")
    if inp.metrics.get("data") is not None:
        shutil.copyfile(inp.metric_paths["data"], dest / "reports" / "data_counts.json")


def eval_set_parquet(files: list[Path], dest: Path) -> None:
    """One Parquet file of the rows of a prompt set's JSONL / JSON / Parquet files, in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.errors import DataError
    from pipeline.core.io import iter_jsonl, read_json

    tables = []
    for f in files:
        if f.suffix == ".parquet":
            tables.append(pq.read_table(f))
            continue
        rows = read_json(f) if f.suffix == ".json" else [obj for _, obj in iter_jsonl(f)]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f, None, "a list of JSON objects (one prompt each)", type(rows).__name__)
        try:
            tables.append(pa.Table.from_pylist(rows))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f, None, "one type per field across rows (to publish it as Parquet)", str(e)) from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(files[0].parent, None, "files of one prompt set share their fields' types", str(e)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest)


def _copy_metrics(inp: ReleaseInputs, dest: Path) -> None:
    (dest / "eval").mkdir(parents=True, exist_ok=True)
    for name, f in inp.metric_paths.items():
        if inp.metrics.get(name) is not None:
            shutil.copyfile(f, dest / "eval" / f"{name}.json")


def _published_files(inp: ReleaseInputs, model_files: list[str]) -> dict[str, dict[str, str]]:
    """What is published from paths.model / paths.dataset, keyed as their producers recorded them."""
    return {"model": {rel: sha256_file(inp.model_dir / rel) for rel in model_files},
            "dataset": {f.name: sha256_file(f) for f in [*inp.split_files.values(), *inp.side_tables.values()]}}


def run_gates(params: Params, root: Path, inp: ReleaseInputs, code: CodeState, lic: LicenseDecision,
              model_files: list[str], *, dry_run: bool, strict: bool, check_dvc: bool,
              require_reproduced_lock: bool = False) -> list[G.GateResult]:
    """Every gate but the secret scan (which needs the finished bundle), in the order they are reported."""
    pp = params.publish
    results = [G.git_clean(code), G.git_version(code, root)]
    results.append(G.dvc_status(root) if check_dvc else
                   G.GateResult("dvc-status", "fail", "not checked inside dvc repro (DVC holds its lock)"))
    if require_reproduced_lock:
        results.append(G.dvc_lock_reproduced(root))
    results += [
        G.validation(inp),
        G.lineage(inp, _published_files(inp, model_files)),
        G.eval_thresholds(inp.metrics.get("eval"), pp.thresholds),
        G.trivial_floor(inp.metrics.get("eval"), pp.beat_trivial_floor),
        G.regression(inp.metrics.get("eval"), _previous_eval(pp.previous_release, params), pp.previous_release,
                     pp.regression_tolerance),
        G.contamination(inp, pp.contamination_ngram),
        G.licenses(lic, pp.allowed_licenses),
    ]
    results = G.finalize(results, dry_run=dry_run, strict=strict)
    for r in results:
        (log.warning if r.status in ("fail", "warn") else log.info)("gate %s", r.line())
    return results


def _committed(root: Path, commit: str, rel: str | None) -> bytes | None:
    """The bytes of `rel` as committed at `commit` (the key an auditor's clone will hold), or None."""
    import subprocess

    if not rel:
        return None
    out = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=root, capture_output=True, timeout=120)
    return out.stdout if out.returncode == 0 else None


def _previous_eval(name: str | None, params: Params) -> dict[str, Any] | None:
    if not name:
        return None
    from pipeline.core.io import read_json

    folder = Path(name)
    for candidate in (folder / MODEL_DIR / "eval" / "eval.json", folder / "eval" / "eval.json"):
        if candidate.is_file():
            return read_json(candidate)
    if "@" in name and not folder.exists():
        from pipeline.release import hub

        repo, rev = name.rsplit("@", 1)
        return hub.fetch_json(params.publish.endpoint, repo, "eval/eval.json", rev)
    return None


def _add_report(bundle: Path, manifest: dict[str, Any]) -> None:
    """Write model/report.html (pipeline.release.report) and list it in the manifest, before signing.

    The page shows the audit of the finished but unsigned bundle: every check but the signature, which
    is made afterwards and covers the page too; the verdict is therefore never "passed" (no anchor).
    """
    from pipeline.release import audit, report

    result = audit.check_bundle(bundle)
    sig = next((c for c in result.checks if c.name == "signature"), None)
    if sig is not None and sig.status == audit.FAILED:
        result.problems = [p for p in result.problems if p not in sig.detail]
        sig.status, sig.detail = audit.SKIPPED, ("the signature is made after this page is written (it covers "
                                                 "the page); run openrelease audit or report to check it")
    page = bundle / MODEL_DIR / report.REPORT_FILE
    atomic_write_text(page, report.render(result, "this release, as built", bundle / MODEL_DIR,
                                          note=report.BUILT_NOTE))
    manifest["files"]["model"] = sorted([*manifest["files"]["model"], {
        "path": report.REPORT_FILE, "sha256": sha256_file(page), "size": page.stat().st_size}],
        key=lambda f: f["path"])
    atomic_write_json(bundle / MODEL_DIR / MANIFEST_FILE, manifest)


def build_bundle(params: Params, root: Path, out: Path, *, dry_run: bool, strict: bool = False,
                 version: str | None = None, model_repo: str | None = None, dataset_repo: str | None = None,
                 endpoint: str | None = None, check_dvc: bool = True, require_reproduced_lock: bool = False) -> Bundle:
    """Gather inputs, run the gates, write cards, manifest, BOM and signature into `out` (atomically).

    Raises GateError listing every failed gate; then nothing is written to `out`.
    """
    from pipeline.core import rounds
    from pipeline.release import audit, datadocs, secretscan, signing, sweep_release
    from pipeline.release.bom import build_bom
    from pipeline.release.cards import write_cards

    root = root.resolve()
    params = rounds.release_view(params, root)  # iterative DPO: the model, data and metrics of the round that ships
    pp = params.publish
    inp = gather(params, root)
    code = code_state(root, version or pp.version, pp.tag_pattern)
    info = release_info(params, code, model_repo, dataset_repo, endpoint)
    lic = license_decision(inp)
    method = signing.signing_method()
    key = signing.resolve_key(pp.signing_key, root / params.paths.keys) if method == "key" else None
    log.info("building release %s (%s) from %s into %s", info.version, code.version_from, code.short, out)
    model_files = _model_files(inp.model_dir, pp.include_adapter)
    results = run_gates(params, root, inp, code, lic, model_files, dry_run=dry_run, strict=strict, check_dvc=check_dvc,
                        require_reproduced_lock=require_reproduced_lock)
    results.append(G.signing_anchor(method, pp.public_key, _committed(root, code.commit, pp.public_key),
                                    key.public_pem if key else None))
    G.enforce(results)  # fail before copying half a gigabyte
    with atomic_dir(out) as tmp:
        model, dataset = tmp / MODEL_DIR, tmp / DATASET_DIR
        _copy_files(inp.model_dir, model_files, model)
        _copy_dataset(inp, dataset)
        _copy_metrics(inp, model)
        sweep_entry = sweep_release.copy_into(root, params.paths.reports, model)  # None: no sweep ran
        # run records are filed under each record's own stage name (release_lineage re-keys a later round's)
        names = {k: inp.lineage[k].get("stage", k) for k in inp.stages()}
        runs, runs_missing = read_run_records(root / params.paths.runs, root / params.paths.lineage, list(names.values()),
                                              shown=params.paths.runs)
        runs = {k: runs[n] for k, n in names.items() if n in runs}
        datadocs.copy_into(root / params.paths.reports, dataset, runs)
        write_cards(inp, info, lic, model, dataset)
        write_croissant(inp, info, lic, dataset)   # last in dataset/: it lists every other file's sha256
        archive = source_archive(root, code.commit, f"{PROJECT}-{info.version}",
                                 model / "source" / f"{PROJECT}-{info.version}.tar.gz")
        if key is not None:
            (model / signing.PUBLIC_KEY_FILE).write_bytes(key.public_pem)
        # The manifest records a passing secrets gate; if the scan below fails, no bundle is kept.
        results.append(G.GateResult("secrets", "pass", "no tokens or keys found"))
        lock_sha = sha256_file(inp.dvc_lock_path) if inp.dvc_lock_path and inp.dvc_lock_path.is_file() else None
        manifest_params = {k: params.section_dump(k) for k in MANIFEST_PARAMS}
        manifest_params["publish"].pop("signing_key", None)  # a local path to a private key: never published
        for note in runs_missing:
            log.warning("run facts: %s; the manifest says so under runs_missing", note)
        manifest = scrub_local_paths(build_manifest(
            info=info, bundle=tmp, lineage=inp.lineage, dvc_stages=dvc_stage_hashes(inp.dvc_lock),
            dvc_lock_sha256=lock_sha, archive=archive, license=lic.to_dict(),
            gates=[r.to_dict() for r in results], public_key_sha256=key.fingerprint if key else None,
            params=manifest_params, method=method, repo_public_key=pp.public_key,
            runs=runs, runs_missing=runs_missing), root)
        if sweep_entry:
            manifest["sweep"] = sweep_entry
        if summary := rounds.read_summary(root, params):  # every round: its model and the model that sampled its data
            manifest["rounds"] = summary
        # signed with the rest: the takedowns applied (hashes and reasons, never content), which earlier
        # releases' weights saw a removed record, and the release this one supersedes
        manifest.update(removals(inp))
        bom = atomic_write_text(model / BOM_FILE, build_bom(manifest))
        manifest["files"]["model"] = sorted([*manifest["files"]["model"], {
            "path": BOM_FILE, "sha256": sha256_file(bom), "size": bom.stat().st_size}], key=lambda f: f["path"])
        atomic_write_json(model / MANIFEST_FILE, manifest)
        _add_report(tmp, manifest)

        scan = G.secrets(*secretscan.scan_folder(tmp))
        log.info("gate %s", scan.line())
        if scan.status != "pass":
            results[-1] = scan
            G.enforce(results)
        if key is not None:
            signing.sign_folder(model, key)
        else:
            signing.sign_folder_sigstore(model)
        # keyless: the signer identity is checked by the auditor (--identity/--issuer), not here
        anchor = audit.Anchor(public_key=model / signing.PUBLIC_KEY_FILE) if key else None
        problems = [p for p in audit.check_bundle(tmp, anchor=anchor).problems
                    if key is not None or not p.startswith("this release is signed keyless")]
        if problems:  # a bug in this module, not a user error: say exactly what
            raise AssertionError("the fresh bundle does not audit clean: " + "; ".join(problems))
    log.info("release %s written to %s", info.version, out)
    return Bundle(path=out, info=info, manifest=manifest, gates=results)
