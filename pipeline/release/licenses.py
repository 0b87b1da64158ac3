"""Deriving the release license from the base model's and the data sources' licenses.

Licenses are SPDX expressions (`MIT`, `MIT OR CC-BY-NC-4.0`, `Apache-2.0 AND CC-BY-4.0`), parsed with
`license-expression` against the SPDX license list: `OR` is the licensee's choice (the least
restrictive option counts), `AND` means every term applies. Each SPDX id has a set of restrictions a
derivative inherits:

- non-commercial (CC *-NC-*): the release must be non-commercial too;
- no-derivatives (CC *-ND-*): a model trained on it cannot be released at all;
- share-alike (CC-BY-SA, ODbL, CDLA-Sharing): the release must be under that same license;
- copyleft (GPL, AGPL, LGPL, MPL, EPL, EUPL, ...): the release must be under that same license.

The model is a derivative of its base weights and of its training data, so the release license is the
base model's when every source allows it. A data source whose license is missing, not SPDX, or
unparseable is a conflict (its terms are unknown), as is a valid SPDX id this screen does not classify.
A conflict fails the gate unless params carry `card.license_override` with a reason, printed in both
cards. The base model may carry a named model license the Hub knows (llama3, gemma, openrail-m...).
This is a conservative screen, not legal advice; the cards say so.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

NC, ND, SA, COPYLEFT = "non-commercial", "no-derivatives", "share-alike", "copyleft"
# SPDX ids (lower-cased) with no restriction a derivative inherits (attribution aside).
PERMISSIVE = {
    "apache-2.0", "mit", "mit-0", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc", "zlib", "unlicense",
    "cc0-1.0", "cc-by-4.0", "cc-by-3.0", "cc-by-2.5", "cc-by-2.0", "odc-by-1.0", "pddl-1.0", "cdla-permissive-1.0",
    "cdla-permissive-2.0", "bsl-1.0", "afl-3.0", "ecl-2.0", "ncsa", "postgresql", "wtfpl", "0bsd", "python-2.0",
}
SHARE_ALIKE_IDS = {"cc-by-sa-4.0", "cc-by-sa-3.0", "cc-by-sa-2.5", "cc-by-sa-2.0", "odbl-1.0", "cdla-sharing-1.0"}
COPYLEFT_PREFIXES = ("gpl-", "agpl-", "lgpl-", "mpl-", "epl-", "eupl-", "osl-", "cecill-", "gfdl-")
# Model licenses the Hub knows that are not on the SPDX list: allowed for the base model only.
MODEL_LICENSES = {
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "openrail", "openrail++",
    "creativeml-openrail-m", "bigscience-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m",
    "deepfloyd-if-license", "fair-noncommercial-research-license",
}
# The Hub's card `license` ids (docs: hub/repositories-licenses); anything else is `other` + license_name.
HUB_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc",
    "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa",
    "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "llama4", "gemma", "fair-noncommercial-research-license", "unknown", "other",
}


@lru_cache(maxsize=1)
def _licensing():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def restrictions_of(spdx_id: str) -> set[str] | None:
    """The restrictions one SPDX id passes on to a derivative; None: not classified by this screen."""
    lid = spdx_id.lower()
    out = set()
    if lid.startswith("cc-by-"):
        parts = lid.split("-")
        out |= {NC} if "nc" in parts else set()
        out |= {ND} if "nd" in parts else set()
        out |= {SA} if "sa" in parts else set()
        return out if out or lid in PERMISSIVE else None
    if lid in SHARE_ALIKE_IDS:
        return {SA}
    if lid.startswith(COPYLEFT_PREFIXES):
        return {COPYLEFT}
    return set() if lid in PERMISSIVE else None


@dataclass
class Parsed:
    """A license as this screen understands it."""

    text: str                      # what params said
    expression: str | None = None  # SPDX-normalised, None when unparseable
    error: str | None = None       # why it could not be used
    restrictions: set[str] = field(default_factory=set)  # of the least restrictive choice
    terms: list[str] = field(default_factory=list)       # SPDX ids of that choice
    custom: bool = False           # a named model license (base model only)

    @property
    def kind(self) -> str:
        if self.error:
            return "unknown"
        if self.custom:
            return "custom"
        return ", ".join(sorted(self.restrictions)) or "permissive"


def _choose(expr) -> tuple[set[str], list[str]] | None:
    """(restrictions, ids) of the least restrictive reading of an expression; None if a term is unclassified."""
    from license_expression import AND, OR, LicenseSymbol, LicenseWithExceptionSymbol

    if isinstance(expr, LicenseWithExceptionSymbol):
        expr = expr.license_symbol
    if isinstance(expr, LicenseSymbol):
        r = restrictions_of(expr.key)
        return None if r is None else (r, [expr.key])
    parts = [_choose(a) for a in expr.args]
    if isinstance(expr, AND):
        if any(p is None for p in parts):
            return None
        return set().union(*(p[0] for p in parts)), [t for p in parts for t in p[1]]
    if isinstance(expr, OR):
        known = [p for p in parts if p is not None]
        return min(known, key=lambda p: (len(p[0]), sorted(p[0]))) if known else None
    return None


def parse(text: str | None, allow_model_license: bool = False) -> Parsed:
    """Parse an SPDX id or expression; never raises (a failure is `Parsed.error`)."""
    from license_expression import ExpressionError

    raw = (text or "").strip()
    p = Parsed(text=raw)
    if not raw or raw.lower() in ("unknown", "none", "noassertion", "other", "null"):
        p.error = "no license"
        return p
    if allow_model_license and raw.lower() in MODEL_LICENSES:
        p.expression, p.custom, p.terms = raw.lower(), True, [raw.lower()]
        return p
    try:
        expr = _licensing().parse(raw, validate=True, strict=True)
    except ExpressionError as e:
        p.error = f"not a valid SPDX license expression ({e})"
        return p
    if expr is None:
        p.error = "no license"
        return p
    p.expression = str(expr)
    chosen = _choose(expr)
    if chosen is None:
        p.error = f"{p.expression} is SPDX but not classified by this screen (review it; override with a reason)"
        return p
    p.restrictions, p.terms = chosen
    return p


def kind(license_id: str | None) -> str:
    return parse(license_id, allow_model_license=True).kind


@dataclass
class LicenseDecision:
    """What the release is published under, why, and what (if anything) blocks it."""

    release: str                       # the SPDX id the model is released under
    derived: str                       # what the inputs alone give (before an override)
    dataset: str                       # the dataset repo's license
    inputs: list[dict[str, Any]] = field(default_factory=list)   # {role, name, license, kind}
    conflicts: list[str] = field(default_factory=list)           # each one line
    override: dict[str, str] | None = None                       # {license, reason}

    @property
    def ok(self) -> bool:
        return not self.conflicts or self.override is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def source_conflicts(name: str, lic: Parsed, release: Parsed) -> list[str]:
    """Why a data source's license does not allow the release license (one line each)."""
    if lic.error:
        return [f"data source {name!r} license {lic.text!r}: {lic.error}; its terms are unknown"]
    out = []
    rel_terms = {t.lower() for t in release.terms}
    if ND in lic.restrictions:
        out.append(f"data source {name!r} is {lic.expression} (no derivatives): a model trained on it cannot be released")
    if NC in lic.restrictions and NC not in release.restrictions:
        out.append(f"data source {name!r} is {lic.expression} (non-commercial) but the release would be "
                   f"{release.expression or release.text}, which allows commercial use")
    for rule in (SA, COPYLEFT):
        if rule in lic.restrictions:
            need = sorted(t for t in lic.terms if rule in (restrictions_of(t) or set()))
            if not {t.lower() for t in need} <= rel_terms:
                out.append(f"data source {name!r} is {lic.expression} ({rule}) but the release would be "
                           f"{release.expression or release.text}, not {' AND '.join(need)}")
    return out


def derive(base_name: str, base_license: str, sources: list[dict[str, Any]],
           override: dict[str, str] | None = None) -> LicenseDecision:
    """Derive the release license from the base model and the data `sources` ({name, license})."""
    base = parse(base_license, allow_model_license=True)
    parsed = [(s.get("name", "?"), s.get("license"), parse(s.get("license"))) for s in sources]
    inputs = [{"role": "base model", "name": base_name, "license": base_license, "kind": base.kind}]
    inputs += [{"role": "data source", "name": n, "license": lic, "kind": p.kind} for n, lic, p in parsed]
    conflicts = []
    if base.error:
        conflicts.append(f"base model {base_name} license {base_license!r}: {base.error}")
    release = base if not override else parse(override["license"], allow_model_license=True)
    if override and release.error:
        conflicts.append(f"card.license_override license {override['license']!r}: {release.error}")
    for name, _, p in parsed:
        conflicts += source_conflicts(name, p, base)   # what the inputs alone allow, before any override
    if not sources:
        conflicts.append("no data sources are declared (data.sources); the data's license is unknown")
    # The dataset repo redistributes the rows, each under its own source's license: all of them apply.
    terms = sorted({p.expression or str(lic) for _, lic, p in parsed})
    dataset = " AND ".join(f"({t})" if " " in t and len(terms) > 1 else t for t in terms) or "unknown"
    return LicenseDecision(release=override["license"] if override else base_license, derived=base_license,
                           dataset=dataset, inputs=inputs, conflicts=conflicts,
                           override=dict(override) if override else None)


def _hub_id(spdx: str) -> str:
    lid = spdx.lower().removesuffix("-only").removesuffix("-or-later")
    return {"odc-by-1.0": "odc-by", "odbl-1.0": "odbl", "pddl-1.0": "pddl"}.get(lid, lid)


def hub_metadata(license_expr: str) -> dict[str, Any]:
    """Card metadata for a license: a Hub id, a list of them for an `A AND B`, else `other` + license_name."""
    p = parse(license_expr, allow_model_license=True)
    expr = p.expression or license_expr.strip()
    if p.error is None and " OR " not in expr and " WITH " not in expr:
        ids = [_hub_id(t) for t in re.split(r" AND ", expr.replace("(", "").replace(")", ""))]
        if all(i in HUB_LICENSES for i in ids):
            return {"license": ids[0] if len(ids) == 1 else ids}
    name = re.sub(r"[^a-z0-9.]+", "-", expr.lower()).strip("-") or "unknown"
    return {"license": "other", "license_name": name}
