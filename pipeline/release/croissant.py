"""`croissant.json`: Croissant 1.1 metadata (mlcommons.org/croissant) of the dataset repo.

Written last into the bundle's dataset folder, so it lists every other file there as a FileObject with
its real sha256 (`contentUrl` relative to the repo root, so a download is checked where it lies), one
RecordSet per config and split with a Field per Parquet column (types from the Arrow schema, lists as
`isArray`, structs as `subField`), and the responsible-AI fields (`rai:*`) from the same facts the
dataset card states (pipeline.release.dataset_card). tests/test_release_croissant.py validates it with
the `mlcroissant` library and reads records through it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_json
from pipeline.core.lineage import sha256_file
from pipeline.release.inputs import ReleaseInputs
from pipeline.release.licenses import LicenseDecision
from pipeline.release.manifest import ReleaseInfo

CROISSANT_FILE = "croissant.json"
CONFORMS_TO = "http://mlcommons.org/croissant/1.1"
# The JSON-LD context of Croissant 1.1, as mlcroissant 1.1.1 writes it.
CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet", "format": "cr:format",
    "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
    "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "samplingRate": "cr:samplingRate", "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source",
    "subField": "cr:subField", "transform": "cr:transform"}
FORMATS = {".parquet": "application/x-parquet", ".json": "application/json", ".jsonl": "application/jsonlines",
           ".md": "text/markdown", ".html": "text/html", ".csv": "text/csv", ".png": "image/png", ".txt": "text/plain",
           ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".gz": "application/gzip"}


def _data_type(t) -> str:
    import pyarrow as pa

    if pa.types.is_boolean(t):
        return "sc:Boolean"
    if pa.types.is_integer(t):
        return "sc:Integer"
    if pa.types.is_floating(t):
        return "sc:Float"
    return "sc:Text"


def _field(prefix: str, name: str, t, file_id: str, column: str, path: str | None = None) -> dict[str, Any]:
    import pyarrow as pa

    f: dict[str, Any] = {"@type": "cr:Field", "@id": f"{prefix}/{name}", "name": name}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        f["isArray"], f["arrayShape"], t = True, "-1", t.value_type
    source: dict[str, Any] = {"fileObject": {"@id": file_id}, "extract": {"column": column}}
    if path:
        source["transform"] = {"jsonPath": path}
    f["source"] = source
    if pa.types.is_struct(t):
        f["subField"] = [_field(f"{prefix}/{name}", c.name, c.type, file_id, column, c.name) for c in t]
    else:
        f["dataType"] = _data_type(t)
    return f


def record_sets(configs: list[dict[str, Any]], dataset_dir: Path) -> list[dict[str, Any]]:
    """A RecordSet per config and split of the card's `configs`, its fields read from the Parquet schema."""
    import pyarrow.parquet as pq

    out = []
    for c in configs:
        for df in c["data_files"]:
            rs = f"{c['config_name']}/{df['split']}"
            schema = pq.read_schema(dataset_dir / df["path"])
            out.append({"@type": "cr:RecordSet", "@id": rs, "name": rs,
                        "description": f"config `{c['config_name']}`, split `{df['split']}` ({df['path']})",
                        "field": [_field(rs, col.name, col.type, df["path"], col.name) for col in schema]})
    return out


def rai_fields(inp: ReleaseInputs) -> dict[str, Any]:
    """The Croissant RAI vocabulary, stated from the run's own facts (no number that was not measured)."""
    from pipeline.release.dataset_card import facts, on_policy_sources

    f = facts(inp)
    on, other = on_policy_sources(inp)
    gp, gm = f["gen"], f["gen_m"]
    collection = (f"{f['generator']} answered each of {gm.get('prompts')} project-written prompts "
                  f"{gp.get('samples_per_prompt')} times (temperature {gp.get('temperature')}, top-p {gp.get('top_p')}, "
                  f"at most {gp.get('max_new_tokens')} new tokens, seed {gp.get('seed')}): {gm.get('completions')} "
                  "samples." if on else "No on-policy samples.")
    others = [f"{s.get('name')} ({s.get('format')}, {s.get('license')}, {inp.source_path(s)})" for s in other]
    return {
        "rai:dataCollection": collection + (" Other sources: " + "; ".join(others) + "." if others else
                                            " No other source."),
        "rai:dataCollectionType": ["Machine-generated (sampled from a language model)", *(["Secondary data"] * bool(others))],
        "rai:dataCollectionRawData": "The prompts are the project's own (data/prompts/ in the code repository); "
                                     "the answers are model samples kept by the generate stage.",
        "rai:dataAnnotationProtocol": "Rated by rule, not by people: IFEval's strict verifiable-instruction checkers "
                                      "(rating 1 + round_half_up(4 x share of instructions followed)); a degenerate "
                                      "or cut sample (the project's validity rules) is credited with nothing.",
        "rai:dataAnnotationPlatform": "Deterministic checkers in the open-release code (pipeline/constraints/).",
        "rai:machineAnnotationTools": ["IFEval instruction checkers (strict)", "open-release validity rules"],
        "rai:annotationsPerItem": "One rule-based rating per sampled answer.",
        "rai:dataPreprocessingProtocol": "Validated (Great Expectations), exact and near-duplicate prompts removed, "
                                         "decontaminated against every evaluation prompt set (word "
                                         f"{f['build'].get('decontam_ngram')}-gram overlap), split by prompt, "
                                         "binarized per split (see the dataset card).",
        "rai:dataBiases": [
            "Answers come from one 135M-parameter model: its errors, style and knowledge gaps are in every reply.",
            "Ratings reward only verifiable formatting instructions (casing, counts, lists, JSON, endings), "
            "not helpfulness, truthfulness or safety.",
            "Prompts are English and written by the project, templated around the instruction types.",
            f"A reply cut at the token limit is handled by rate.unfinished = {f['rate'].get('unfinished')}; where "
            "it is credited with nothing it is never chosen, so a pair whose rejected reply is cut (rejected_cut) "
            "also differs in length."],
        "rai:dataLimitations": [f"Small: {sum(inp.splits.values())} pairs.", "Not reviewed by people; replies may "
                                "be wrong or nonsensical even when chosen."],
        "rai:dataUseCases": ["Reproducing and studying this release's DPO run.", "Teaching and testing preference "
                             "tuning pipelines.", "Not for training assistants meant for real users."],
        "rai:personalSensitiveInformation": ["None intended: prompts are project-written and contain no personal "
                                             "data; answers are model samples, not reviewed by people."],
        "rai:dataSocialImpact": "Low: a small research dataset for a small model; replies were not safety-reviewed.",
        "rai:dataReleaseMaintenancePlan": "Each release is a tagged, signed, immutable version; records are removed on "
                                          "request through data/takedowns.yaml in a later release.",
    }


def croissant(inp: ReleaseInputs, info: ReleaseInfo, lic: LicenseDecision, dataset_dir: Path,
              configs: list[dict[str, Any]]) -> dict[str, Any]:
    files = sorted(p for p in dataset_dir.rglob("*") if p.is_file() and p.name != CROISSANT_FILE
                   and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts))
    distribution = []
    for p in files:
        rel = p.relative_to(dataset_dir).as_posix()
        distribution.append({"@type": "cr:FileObject", "@id": rel, "name": rel, "contentUrl": rel,
                             "encodingFormat": FORMATS.get(p.suffix, "application/octet-stream"),
                             "sha256": sha256_file(p)})
    name = info.dataset_repo.split("/")[-1]
    from pipeline.release.gitinfo import git

    # the release commit's date: the same for every build of that commit (no wall-clock time in the file)
    date = git(inp.root, "show", "-s", "--format=%cs", info.commit, check=False)
    semver = re.fullmatch(r"v?(\d+\.\d+\.\d+(?:[-+].*)?)", info.version)
    return {
        "@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO, "name": name,
        "description": (f"Preference pairs that trained {info.model_repo} release {info.version}: on-policy samples "
                        "of the base model rated by IFEval's verifiable-instruction checkers, with the evaluation "
                        "prompts and both models' evaluation answers."),
        "url": f"{info.endpoint}/datasets/{info.dataset_repo}",
        "version": semver.group(1) if semver else info.version,   # Croissant asks for MAJOR.MINOR.PATCH
        **({"datePublished": date.strip()} if date and date.strip() else {}),
        "license": f"https://spdx.org/licenses/{lic.dataset}.html" if lic.dataset and " " not in lic.dataset else lic.dataset,
        "citeAs": f"{info.dataset_repo}, release {info.version} ({info.endpoint}/datasets/{info.dataset_repo})",
        "creator": {"@type": "sc:Organization", "name": "open-release"},
        "keywords": ["dpo", "preference", "on-policy", "ifeval"], "isLiveDataset": False,
        **rai_fields(inp),
        "distribution": distribution, "recordSet": record_sets(configs, dataset_dir),
    }


def check_croissant(dataset_dir: Path) -> list[str]:
    """Problems with a downloaded dataset's croissant.json: a file it lists that is missing or has another
    sha256, a file of the download it does not list, or JSON that does not parse (what `openrelease audit`
    reports; the schema itself is mlcroissant's to validate)."""
    import json

    path = dataset_dir / CROISSANT_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        listed = {f["contentUrl"]: f.get("sha256") for f in doc.get("distribution") or []
                  if f.get("@type") == "cr:FileObject"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return [f"{CROISSANT_FILE}: unreadable ({e})"]
    problems = []
    for rel, sha in sorted(listed.items()):
        f = dataset_dir / rel
        if not f.is_file():
            problems.append(f"{CROISSANT_FILE}: lists {rel}, which the download does not hold")
        elif sha256_file(f) != sha:
            problems.append(f"{CROISSANT_FILE}: sha256 of {rel} is {sha256_file(f)[:16]}..., it says {str(sha)[:16]}...")
    present = {p.relative_to(dataset_dir).as_posix() for p in dataset_dir.rglob("*") if p.is_file()
               and p.name != CROISSANT_FILE and not any(x.startswith(".") for x in p.relative_to(dataset_dir).parts)}
    problems += [f"{CROISSANT_FILE}: does not list {rel}" for rel in sorted(present - set(listed))]
    return problems


def write_croissant(inp: ReleaseInputs, info: ReleaseInfo, lic: LicenseDecision, dataset_dir: Path) -> Path:
    from pipeline.release.cards import dataset_configs

    return atomic_write_json(dataset_dir / CROISSANT_FILE, croissant(inp, info, lic, dataset_dir, dataset_configs(inp)))
