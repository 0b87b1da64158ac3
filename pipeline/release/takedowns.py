"""What a release says and proves about takedowns (pipeline.data.takedowns drops the records at ingest).

`removals(inp)` is computed once per release from the ingest lineage record (the takedowns applied:
hash, reason, date, reference, records dropped; never content) and `publish.previous_release` (the
release this one supersedes). Walking the chain of superseded releases (each manifest names its
predecessor), it finds which earlier releases' weights were trained with a removed record: their
`data/provenance.parquet` has a train pair whose `record_sha256` is taken down. Released weights
cannot unlearn, so the model card says so. The result goes into the signed manifest (`takedowns`,
`supersedes`) and is rendered into both cards' "Data removals" sections.

`audit_problems` is the audit's side: no pair in the release's provenance derives from a listed
record, every published pair has provenance with record hashes, and both cards' sections are exactly
what the signed manifest renders to (a card listing a takedown the manifest does not, or the reverse,
fails).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError

log = logging.getLogger(__name__)

MAX_CHAIN = 50   # superseded releases walked back; a longer history is reported as unchecked
HEADING = "## Data removals"


def applied_takedowns(inp) -> list[dict[str, Any]]:
    """The takedowns the ingest stage applied, as its lineage record lists them."""
    extra = (inp.record("ingest") or {}).get("extra") or {}
    return [t for t in extra.get("takedowns") or [] if isinstance(t, dict) and t.get("sha256")]


def _supersedes(ref: str, view) -> dict[str, Any]:
    m = view.manifest or {}
    repos = m.get("repos") or {}
    return {"release": ref, "version": view.version,
            "model_repo": (repos.get("model") or {}).get("repo_id"),
            "dataset_repo": (repos.get("dataset") or {}).get("repo_id"),
            "commit": (m.get("code") or {}).get("commit")}


def _trained_with(view, shas: set[str]) -> tuple[dict[str, int], bool]:
    """{sha: train pairs} of the removed records in a release, and whether its provenance has record hashes."""
    hits: dict[str, int] = {}
    rows = view.provenance()
    if rows and "record_sha256" not in rows[0]:
        return {}, False
    for p in rows:
        if p.get("split") != "train":
            continue
        for s in set(p.get("record_sha256") or []) & shas:
            hits[s] = hits.get(s, 0) + 1
    return dict(sorted(hits.items())), True


def compute_removals(applied: list[dict[str, Any]], previous: str | None, endpoint: str | None,
                     root: Path) -> dict[str, Any]:
    """The manifest's `takedowns` and `supersedes` entries (module docstring)."""
    from pipeline.release.manifest import scrub_local_paths
    from pipeline.release.trace import load_release

    shas = {t["sha256"] for t in applied}
    earlier: list[dict[str, Any]] = []
    supersedes, unchecked = None, None
    if previous:
        seen: set[str] = set()
        ref: str | None = previous
        with tempfile.TemporaryDirectory(prefix="openrelease-previous-") as tmp:
            while ref and ref not in seen:
                if len(seen) >= MAX_CHAIN:
                    unchecked = f"releases before {ref}: more than {MAX_CHAIN} back"
                    break
                seen.add(ref)
                try:
                    view = load_release(ref, endpoint, Path(tmp))
                except SourceError as e:
                    if supersedes is None:  # the release this one replaces must be readable
                        raise SourceError(f"publish.previous_release: {e}") from None
                    unchecked = str(e)
                    break
                if supersedes is None:
                    supersedes = _supersedes(ref, view)
                if shas:
                    hits, hashed = _trained_with(view, shas)
                    if not hashed:
                        unchecked = f"{ref} and earlier: provenance without record_sha256 (made before takedowns existed)"
                        break
                    earlier.append({"release": ref, "version": view.version, "trained_with": hits})
                nxt = ((view.manifest or {}).get("supersedes") or {}).get("release")
                ref = nxt if isinstance(nxt, str) else None
    out = {"applied": [{k: t.get(k) for k in ("sha256", "reason", "date", "reference", "matched")} for t in applied],
           "earlier_releases": earlier, "unchecked": unchecked}
    # scrubbed before the cards render it, so the cards and the (scrubbed) manifest say the same
    return scrub_local_paths({"takedowns": out, "supersedes": supersedes}, root)


def removals(inp) -> dict[str, Any]:
    """compute_removals for a release's inputs, once: the cards and the manifest read the same result."""
    cached = getattr(inp, "_removals", None)
    if cached is None:
        p = inp.params.publish
        cached = compute_removals(applied_takedowns(inp), p.previous_release, p.endpoint, inp.root)
        inp._removals = cached  # a cache on the inputs object: one walk of the release chain per bundle
    return cached


def _short(s: str) -> str:
    return f"`{s}`"


def _table(applied: list[dict[str, Any]]) -> str:
    lines = ["| record sha256 | reason | date | reference | records dropped |", "|---|---|---|---|---|"]
    for t in applied:
        cells = [_short(t["sha256"]), str(t.get("reason") or ""), str(t.get("date") or ""),
                 str(t.get("reference") or "-"), str(t.get("matched") if t.get("matched") is not None else "?")]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def _supersedes_line(sup: dict[str, Any] | None) -> str:
    if not sup:
        return "This release supersedes no earlier release (`publish.previous_release` is null)."
    return f"This release supersedes `{sup.get('release')}` (version `{sup.get('version')}`)."


def dataset_section(r: dict[str, Any]) -> str:
    """The dataset card's "Data removals" body; audit re-renders it from the manifest and compares."""
    t = r.get("takedowns") or {}
    parts = [_supersedes_line(r.get("supersedes"))]
    if not t.get("applied"):
        parts.append("No source record was taken down for this release.")
    else:
        parts += ["These raw source records were removed on request before any pair was built (named by the "
                  "sha256 of the record's canonical JSON; the text is not kept anywhere):", _table(t["applied"]),
                  "No pair here derives from them: `data/provenance.parquet` lists, per pair, the sha256 of every "
                  "raw record it was built from (`record_sha256`), and `openrelease audit` checks it."]
    return "\n\n".join(parts)


def model_section(r: dict[str, Any]) -> str:
    """The model card's "Data removals" body: which earlier releases' weights saw a removed record."""
    t = r.get("takedowns") or {}
    parts = [_supersedes_line(r.get("supersedes"))]
    if not t.get("applied"):
        parts.append("No source record was taken down for this release.")
        return "\n\n".join(parts)
    parts += ["These weights were trained without the raw source records below, removed on request:",
              _table(t["applied"])]
    exposed = [e for e in t.get("earlier_releases") or [] if e.get("trained_with")]
    checked = [e.get("version") or e.get("release") for e in t.get("earlier_releases") or []]
    if exposed:
        lines = ["Released weights cannot unlearn. The weights of these earlier releases were trained with a "
                 "removed record:"]
        for e in exposed:
            recs = ", ".join(f"`{s[:16]}...` ({n} train pair(s))" for s, n in e["trained_with"].items())
            lines.append(f"- `{e.get('version')}` ({e.get('release')}): {recs}")
        parts.append("\n".join(lines))
    elif checked:
        parts.append(f"No earlier release checked ({', '.join(f'`{c}`' for c in checked)}) was trained with them.")
    if t.get("unchecked"):
        parts.append(f"Not checked: {t['unchecked']}.")
    elif not checked:
        parts.append("No earlier release was named, so none was checked.")
    return "\n\n".join(parts)


def audit_problems(manifest: dict[str, Any], model: Path, dataset: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of the takedown checks on a release folder (module docstring)."""
    import pyarrow.parquet as pq

    if "takedowns" not in manifest:
        return [], ["takedowns: the manifest predates takedown records; not checked"]
    r = {"takedowns": manifest.get("takedowns") or {}, "supersedes": manifest.get("supersedes")}
    listed = {t.get("sha256"): t for t in r["takedowns"].get("applied") or []}
    problems: list[str] = []
    for readme, render, what in ((dataset / "README.md", dataset_section, "dataset card"),
                                 (model / "README.md", model_section, "model card")):
        text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
        if f"{HEADING}\n\n{render(r)}\n" not in text:
            problems.append(f"{what}: the \"Data removals\" section is not what the manifest's takedowns render to")
    prov = dataset / "data" / "provenance.parquet"
    if not prov.is_file():
        return [*problems, "dataset/data/provenance.parquet is missing: no pair can be traced to its records"], []
    table = pq.read_table(prov)
    if "record_sha256" not in table.column_names:
        if listed:
            problems.append("dataset/data/provenance.parquet has no record_sha256 column: the takedowns the "
                            "manifest lists cannot be proven absent")
        return problems, []
    ids = table.column("id").to_pylist() if "id" in table.column_names else []
    hashes = table.column("record_sha256").to_pylist()
    known = set(ids)
    for f in sorted((dataset / "data").glob("*.parquet")):
        if f.name == prov.name:
            continue
        split_ids = pq.read_table(f, columns=["id"]).column("id").to_pylist() \
            if "id" in pq.read_schema(f).names else []
        missing = [i for i in split_ids if i not in known]
        if missing:
            problems.append(f"dataset/data/{f.name}: {len(missing)} pair(s) without provenance (e.g. {missing[0]}): "
                            "their records cannot be checked")
    unhashed = [i for i, h in zip(ids, hashes, strict=True) if not h]
    if unhashed and listed:
        problems.append(f"dataset/data/provenance.parquet: {len(unhashed)} pair(s) carry no record_sha256 "
                        f"(e.g. {unhashed[0]}): the takedowns cannot be proven absent")
    for pid, hs in zip(ids, hashes, strict=True):
        for s in set(hs or []) & set(listed):
            problems.append(f"dataset: pair {pid} derives from taken-down record {s} "
                            f"({listed[s].get('reason')}, {listed[s].get('date')})")
    notes = [f"takedowns: none of {len(ids)} released pair(s) derives from the {len(listed)} removed record(s)"] \
        if listed and not any("derives from" in p for p in problems) else []
    return problems, notes
