"""Deriving the release license from the base model's and the data sources' licenses.

The model is a derivative of its base weights and of its training data, so the release license is the
base model's license when every source allows it. A combination that does not (non-commercial or
share-alike data under a permissive model license, no-derivatives data, a source with no license) is a
conflict: the gate fails unless params carry `card.license_override` with a reason, and the reason is
printed in both cards. This is a conservative screen, not legal advice; the cards say so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# SPDX ids (lower-cased) by what they allow a derivative to be released under.
PERMISSIVE = {
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "isc", "zlib", "unlicense", "cc0-1.0", "cc-by-4.0",
    "cc-by-3.0", "cc-by-2.0", "odc-by", "odc-by-1.0", "pddl", "pddl-1.0", "cdla-permissive-1.0",
    "cdla-permissive-2.0", "bsl-1.0", "mpl-2.0", "openrail", "openrail++", "creativeml-openrail-m",
}
SHARE_ALIKE = {"cc-by-sa-4.0", "cc-by-sa-3.0", "gpl-2.0", "gpl-3.0", "agpl-3.0", "lgpl-3.0", "odbl", "odbl-1.0",
               "cdla-sharing-1.0"}
NON_COMMERCIAL = {"cc-by-nc-4.0", "cc-by-nc-3.0", "cc-by-nc-2.0", "cc-by-nc-sa-4.0", "cc-by-nc-sa-3.0"}
NO_DERIVATIVES = {"cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc-by-nc-nd-3.0"}
UNKNOWN = {"", "unknown", "none", "noassertion", "other", "null"}
# The ids the Hub accepts in card metadata (a subset; anything else is written as `other` + license_name).
HUB_LICENSES = PERMISSIVE | SHARE_ALIKE | NON_COMMERCIAL | NO_DERIVATIVES | {
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "afl-3.0", "artistic-2.0", "epl-2.0",
    "eupl-1.1", "gfdl", "lppl-1.3c", "ms-pl", "ncsa", "osl-3.0", "postgresql", "ofl-1.1", "wtfpl", "c-uda",
    "deepfloyd-if-license", "bigscience-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m",
}


def kind(license_id: str | None) -> str:
    """permissive | share-alike | non-commercial | no-derivatives | unknown | custom (a named model license)."""
    lid = (license_id or "").strip().lower()
    if lid in UNKNOWN:
        return "unknown"
    for name, ids in (("permissive", PERMISSIVE), ("share-alike", SHARE_ALIKE),
                      ("non-commercial", NON_COMMERCIAL), ("no-derivatives", NO_DERIVATIVES)):
        if lid in ids:
            return name
    return "custom"


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


def derive(base_name: str, base_license: str, sources: list[dict[str, Any]],
           override: dict[str, str] | None = None) -> LicenseDecision:
    """Derive the release license from the base model and the data `sources` ({name, license})."""
    base_kind = kind(base_license)
    inputs = [{"role": "base model", "name": base_name, "license": base_license, "kind": base_kind}]
    inputs += [{"role": "data source", "name": s.get("name", "?"), "license": s.get("license"),
                "kind": kind(s.get("license"))} for s in sources]
    conflicts = []
    if base_kind == "unknown":
        conflicts.append(f"base model {base_name} has no usable license ({base_license!r})")
    for i in inputs[1:]:
        name, lic, k = i["name"], i["license"], i["kind"]
        if k == "unknown":
            conflicts.append(f"data source {name!r} has no license ({lic!r}); its terms are unknown")
        elif k == "no-derivatives":
            conflicts.append(f"data source {name!r} is {lic} (no derivatives): a model trained on it cannot be released")
        elif k == "non-commercial" and base_kind != "non-commercial":
            conflicts.append(f"data source {name!r} is {lic} (non-commercial) but the release would be "
                             f"{base_license}, which allows commercial use")
        elif k == "share-alike" and base_kind in ("permissive", "custom"):
            conflicts.append(f"data source {name!r} is {lic} (share-alike) but the release would be "
                             f"{base_license}, which does not share alike")
    if not sources:
        conflicts.append("no data sources are declared (data.sources); the data's license is unknown")
    # The dataset repo redistributes the rows, each under its own source's license.
    dataset = " AND ".join(sorted({str(s.get("license")) for s in sources})) or "unknown"
    release = override["license"] if override else base_license
    return LicenseDecision(release=release, derived=base_license, dataset=dataset, inputs=inputs,
                           conflicts=conflicts, override=dict(override) if override else None)


def hub_metadata(license_expr: str) -> dict[str, Any]:
    """Card metadata for a license (or an `A AND B` list): Hub ids where it knows them, else `other`."""
    ids = [x.strip().lower() for x in license_expr.split(" AND ") if x.strip()]
    known = [i for i in ids if i in HUB_LICENSES]
    if ids and len(known) == len(ids):
        return {"license": known[0] if len(known) == 1 else known}
    return {"license": "other", "license_name": license_expr.strip().lower() or "unknown"}
