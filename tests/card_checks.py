"""The card metadata checks the Hub's `/api/validate-yaml` makes that a test server can make too.

The YAML front matter parses to a mapping; `license` is one of the Hub's license ids (an `other`
license names itself in `license_name`); list fields are lists of strings; `language` holds language
codes; `pipeline_tag`, `task_categories` and `size_categories` take the Hub's values; every
`model-index` result names its task type, its dataset (type and name) and metrics with type and
value; dataset `configs` have unique names, data_files with split and path, at most one default.
"""

from __future__ import annotations

import re

import yaml

# The Hub's license identifiers (huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSE_IDS = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research",
    "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0", "odc-by", "odbl", "openmdw-1.0",
    "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr",
    "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "llama4", "gemma", "unknown", "other",
}
PIPELINE_TAGS = {"text-generation", "text2text-generation", "text-classification", "token-classification",
                 "question-answering", "summarization", "translation", "fill-mask", "feature-extraction",
                 "sentence-similarity", "conversational", "image-text-to-text"}
SIZE_CATEGORIES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"}
LANGUAGE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
SPLIT = re.compile(r"^\w+(?:\.\w+)*$")


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def front_matter(content: str) -> tuple[dict | None, list[str]]:
    m = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.S)
    if not m:
        return {}, []
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return None, [f"Invalid YAML in the metadata block: {str(e).splitlines()[0]}"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return None, [f"The metadata block must be a YAML mapping, got {type(data).__name__}"]
    return data, []


def _license(data: dict) -> list[str]:
    lic = data.get("license")
    if lic is None:
        return []
    ids = [lic] if isinstance(lic, str) else lic if _strings(lic) else None
    if ids is None:
        return ['"license" must be a string or a list of strings']
    out = [f'"license" must be one of the Hub license identifiers, got "{i}"' for i in ids if i not in HUB_LICENSE_IDS]
    if "other" in ids and not (isinstance(data.get("license_name"), str) and re.fullmatch(r"[a-z0-9.-]+", data["license_name"])):
        out.append('"license_name" (lowercase letters, digits, "-" and ".") is required when "license" is "other"')
    return out


def _model_index(mi) -> list[str]:
    if not isinstance(mi, list):
        return ['"model-index" must be a list']
    out = []
    for i, entry in enumerate(mi):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            out.append(f'"model-index[{i}].name" must be a string')
            continue
        for j, r in enumerate(entry.get("results") or []):
            where = f'"model-index[{i}].results[{j}]'
            if not isinstance(r, dict):
                out.append(f"{where}\" must be a mapping")
                continue
            if not isinstance((r.get("task") or {}).get("type"), str):
                out.append(f'{where}.task.type" is required')
            ds = r.get("dataset") or {}
            if not (isinstance(ds.get("type"), str) and isinstance(ds.get("name"), str)):
                out.append(f'{where}.dataset" needs "type" and "name"')
            metrics = r.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                out.append(f'{where}.metrics" must be a non-empty list')
                continue
            for k, mt in enumerate(metrics):
                if not (isinstance(mt, dict) and isinstance(mt.get("type"), str) and "value" in mt):
                    out.append(f'{where}.metrics[{k}]" needs "type" and "value"')
    return out


def _configs(configs) -> list[str]:
    if not isinstance(configs, list):
        return ['"configs" must be a list']
    out, names, defaults = [], set(), 0
    for i, c in enumerate(configs):
        name = c.get("config_name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name:
            out.append(f'"configs[{i}].config_name" is required')
            continue
        if name in names:
            out.append(f'"configs": config name "{name}" appears twice')
        names.add(name)
        defaults += bool(c.get("default")) or name == "default"
        files = c.get("data_files")
        items = [files] if isinstance(files, str) else files if isinstance(files, list) else None
        if not items:
            out.append(f'"configs[{i}].data_files" must be a path or a list of {{split, path}}')
            continue
        for f in items:
            if isinstance(f, str):
                continue
            if not (isinstance(f, dict) and isinstance(f.get("split"), str) and SPLIT.match(f["split"])
                    and (isinstance(f.get("path"), str) or _strings(f.get("path")))):
                out.append(f'"configs[{i}].data_files" entry {f!r} needs a split name (\\w+) and a path')
    if defaults > 1:
        out.append('"configs": more than one default config')
    return out


def check_card(content: str, repo_type: str) -> list[str]:
    """The reasons a card's metadata would be refused (empty: valid)."""
    data, errors = front_matter(content)
    if data is None:
        return errors
    errors += _license(data)
    for key in ("tags", "datasets", "task_categories", "size_categories"):
        if key in data and not _strings(data[key]):
            errors.append(f'"{key}" must be a list of strings')
    lang = data.get("language")
    if lang is not None:
        langs = [lang] if isinstance(lang, str) else lang if _strings(lang) else None
        if langs is None or not all(LANGUAGE.match(x) for x in langs):
            errors.append(f'"language" must be language codes (en, fr, pt-BR), got {lang!r}')
    if "base_model" in data and not (isinstance(data["base_model"], str) or _strings(data["base_model"])):
        errors.append('"base_model" must be a repo id or a list of them')
    if repo_type == "model" and data.get("pipeline_tag") is not None and data["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" is not a Hub task: {data["pipeline_tag"]!r}')
    if "model-index" in data:
        errors += _model_index(data["model-index"])
    if repo_type == "dataset":
        bad = [s for s in data.get("size_categories") or [] if s not in SIZE_CATEGORIES]
        errors += [f'"size_categories": {s!r} is not a Hub size category' for s in bad]
        if "configs" in data:
            errors += _configs(data["configs"])
    return errors
