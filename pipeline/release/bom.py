"""A CycloneDX 1.6 ML-BOM of the release: the model, its dataset, base model, data sources, code and
Python environment, with sha256 hashes and licenses, so supply-chain tools can read the lineage too."""

from __future__ import annotations

from typing import Any


def _license(lic: str | None):
    from cyclonedx.model.license import DisjunctiveLicense, LicenseExpression

    if not lic:
        return []
    if " AND " in lic or " OR " in lic:
        return [LicenseExpression(lic)]
    try:
        return [DisjunctiveLicense(id=lic)]
    except ValueError:  # not an SPDX id cyclonedx knows: keep it as a name
        return [DisjunctiveLicense(name=lic)]


def build_bom(manifest: dict[str, Any]) -> str:
    """The BOM as CycloneDX 1.6 JSON, built from the manifest (so it never disagrees with it)."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    def hashes(sha):
        return [HashType(alg=HashAlgorithm.SHA_256, content=sha)] if sha else []

    version = manifest["version"]
    files = {f["path"]: f for f in manifest["files"]["model"]}
    weights = [f for p, f in files.items() if p.endswith(".safetensors") and "/" not in p]
    lic = manifest["license"]
    model = Component(
        name=manifest["repos"]["model"]["repo_id"], version=version, type=ComponentType.MACHINE_LEARNING_MODEL,
        bom_ref="model", hashes=hashes(weights[0]["sha256"] if weights else None), licenses=_license(lic["release"]),
        properties=[Property(name=f"openrelease:file:{f['path']}", value=f["sha256"]) for f in weights],
    )
    bom = Bom()
    bom.metadata.component = model
    dataset = Component(
        name=manifest["repos"]["dataset"]["repo_id"], version=version, type=ComponentType.DATA, bom_ref="dataset",
        licenses=_license(lic["dataset"]),
        properties=[Property(name=f"openrelease:file:{f['path']}", value=f["sha256"])
                    for f in manifest["files"]["dataset"] if f["path"].endswith(".parquet")],
    )
    bom.components.add(dataset)
    depends = [dataset]
    for i, item in enumerate(lic.get("inputs", [])):
        ctype = ComponentType.MACHINE_LEARNING_MODEL if item["role"] == "base model" else ComponentType.DATA
        c = Component(name=str(item["name"]), type=ctype, bom_ref=f"input-{i}", licenses=_license(item.get("license")),
                      properties=[Property(name="openrelease:role", value=item["role"])])
        bom.components.add(c)
        depends.append(c)
    code = manifest["code"]
    source = Component(
        name="source", version=code["commit"], type=ComponentType.APPLICATION, bom_ref="source",
        hashes=hashes(code["archive"]["sha256"]),
        properties=[Property(name="openrelease:archive", value=code["archive"]["path"])])
    bom.components.add(source)
    depends.append(source)
    for name, ver in sorted(manifest["environment"]["packages"].items()):
        bom.components.add(Component(name=name, version=ver, type=ComponentType.LIBRARY, bom_ref=f"pkg:{name}"))
    bom.register_dependency(model, depends)
    return JsonV1Dot6(bom).output_as_string(indent=2)
