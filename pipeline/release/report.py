"""`openrelease report RELEASE --out report.html`: the audit and the release's facts as one HTML file.

RELEASE is what `openrelease audit` takes (a bundle folder, a model download with or without
`--dataset`, or a Hub model repo id) with the same trust-anchor options. The file is self-contained:
inline CSS and inline SVG only, no script, no font, no image and no link that loads anything, so it
opens offline and shows the same thing anywhere. It shows the verdict and the anchor, every check, the
lineage as a graph, the release gates, the evaluation with its intervals beside the trivial-answer
floor and the degeneration rates, the data counts at every step, the licenses and the sweep when
there is one. Numbers are read from the release's own files (eval/eval.json, eval/data.json, the
sweep table), the ones the audit has just checked against the signed manifest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from pipeline.core.errors import AuditError
from pipeline.release.manifest import DATASET_DIR, MANIFEST_FILE, MODEL_DIR

# The page the release carries in its model repo (pipeline.release.bundle writes it)
REPORT_FILE = "report.html"
BUILT_NOTE = ("This copy of the page was written by the publish step while it built the release, before signing: "
              "it shows every check of the finished bundle except the signature, and no trust anchor. It is "
              "what the builder saw, not proof for you: to check what you downloaded, run "
              "<code>openrelease report RELEASE --public-key KEY --out report.html</code> (or --repo-key) yourself.")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.verdict{padding:12px 16px;border-radius:6px;margin:12px 0;font-weight:600}
.passed{background:#e3f4e8;border:1px solid #5bb174}.failed{background:#fbe4e4;border:1px solid #d9534f}
.unanchored{background:#fff4d6;border:1px solid #e0a800}
table{border-collapse:collapse;width:100%;background:#fff;margin:6px 0}
th,td{border:1px solid #e1e4ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.s-passed,.s-pass{color:#1e7b34;font-weight:600}.s-failed,.s-fail{color:#b52a26;font-weight:600}
.s-skipped,.s-skip,.s-warn{color:#8a6100;font-weight:600}
code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.note{color:#5a6170;font-size:12px}svg{background:#fff;border:1px solid #e1e4ea;max-width:100%;height:auto}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v)) if v is not None else "<i>missing</i>"


def _table(head: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    def cell(v: Any) -> str:
        if raw and isinstance(v, str):
            return f"<td>{v}</td>"
        return f'<td class="num">{_fmt(v)}</td>' if isinstance(v, int | float) and not isinstance(v, bool) \
            else f"<td>{_fmt(v)}</td>"
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows) + "</table>")


def _status(s: str) -> str:
    return f'<span class="s-{escape(s)}">{escape(s)}</span>'


def _node_text(n: dict[str, Any]) -> str:
    from pipeline.release.tree import HASH_CHARS

    det, label = n["detail"], n["label"]
    if n["kind"] == "stage":
        label = f"stage {label} · run {str(det.get('mlflow_run', '?'))[:8]} · commit {str(det.get('commit'))[:8]}"
    sub = [f"sha256 {n['sha256'][:HASH_CHARS]}"] if n.get("sha256") else []
    sub += [f"{det['rows']} rows"] if det.get("rows") is not None else []
    sub += [str(det[k]) for k in ("role", "license", "published_as") if det.get(k)]
    return label + (f"  [{', '.join(sub)}]" if sub else "")


def lineage_svg(graph: dict[str, Any] | None) -> str:
    """The lineage tree as an inline SVG: one box per node, columns by depth, elbow edges to children."""
    if not graph:
        return '<p class="note">no lineage: the manifest could not be read</p>'
    rows: list[tuple[int, dict[str, Any], int | None]] = []  # (depth, node, parent row)

    def walk(n: dict[str, Any], depth: int, parent: int | None) -> None:
        rows.append((depth, n, parent))
        me = len(rows) - 1
        for c in n["children"]:
            walk(c, depth + 1, me)
    walk(graph["tree"], 0, None)
    col, row_h, box_h, char_w = 34, 40, 30, 7.3  # char_w: 12px monospace advance, with a margin
    texts = [_node_text(n) for _, n, _ in rows]
    width = int(max(10 + d * col + len(t) * char_w + 16 for (d, _, _), t in zip(rows, texts, strict=True))) + 10
    height = len(rows) * row_h + 10
    fill = {"release": "#dfe9f7", "file": "#e3f4e8", "stage": "#fff4d6", "artifact": "#f1f2f5", "seen": "#ffffff"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="release lineage">']
    for i, (d, n, parent) in enumerate(rows):
        x, y = 10 + d * col, 5 + i * row_h
        if parent is not None:
            px, py = 10 + rows[parent][0] * col + 12, 5 + parent * row_h + box_h
            parts.append(f'<path d="M{px},{py} V{y + box_h / 2} H{x}" fill="none" stroke="#8a93a5"/>')
        text = texts[i]
        box_w = len(text) * char_w + 16
        parts.append(f'<g><title>{escape(text + (" sha256 " + n["sha256"] if n.get("sha256") else ""))}</title>'
                     f'<rect x="{x}" y="{y}" width="{box_w:.0f}" height="{box_h}" rx="4" '
                     f'fill="{fill.get(n["kind"], "#fff")}" stroke="#9aa3b5"/>'
                     f'<text x="{x + 8}" y="{y + 19}" font-size="12" font-family="ui-monospace,monospace">'
                     f'{escape(text)}</text></g>')
    parts.append("</svg>")
    return "".join(parts) + f'<p class="note">{escape(graph["hash_display"])}; hover a box for the full hash</p>'


def _interval_svg(lo: float, mid: float, hi: float, floor: float | None) -> str:
    """A 0..1 axis with the interval as a bar, the estimate as a dot and the trivial floor as a red tick."""
    w = 220

    def x(v: float) -> float:
        return 10 + max(0.0, min(1.0, v)) * (w - 20)
    tick = (f'<line x1="{x(floor):.1f}" y1="2" x2="{x(floor):.1f}" y2="18" stroke="#d9534f" stroke-width="2">'
            f'<title>trivial-answer floor {floor:.4g}</title></line>') if floor is not None else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" viewBox="0 0 {w} 20">'
            f'<line x1="10" y1="10" x2="{w - 10}" y2="10" stroke="#d8dce3"/>'
            f'<line x1="{x(lo):.1f}" y1="10" x2="{x(hi):.1f}" y2="10" stroke="#2f6fbf" stroke-width="5"/>'
            f'<circle cx="{x(mid):.1f}" cy="10" r="4" fill="#1d2330"/>{tick}</svg>')


def evaluation_html(m: dict[str, Any] | None) -> str:
    if not m:
        return '<p class="note">eval/eval.json is missing from the release</p>'
    floor = m.get("pass_rate_floor")
    rows = []
    for k in sorted(k[: -len("_ci_low")] for k in m if k.endswith("_ci_low")):
        lo, hi, v = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high"), m.get(k)
        if all(isinstance(t, int | float) for t in (lo, hi, v)):
            scale = 0 <= lo and hi <= 1
            rows.append([k, v, f"[{lo:.4g}, {hi:.4g}]",
                         _interval_svg(lo, v, hi, floor if k.startswith("pass_rate") else None) if scale else ""])
    out = ["<h3>Headline numbers with 95% intervals over test prompts</h3>",
           _table(["metric", "value", "interval", "0 ... 1"], [[escape(r[0]), r[1], escape(r[2]), r[3]] for r in rows],
                  raw=True) if rows else '<p class="note">no metric in eval.json carries an interval</p>']
    panel = sorted((k[len("panel_"): -len("_pass_rate")], v) for k, v in m.items()
                   if k.startswith("panel_") and k.endswith("_pass_rate"))
    out.append("<h3>Trivial-answer floor</h3>")
    if floor is None and not panel:
        out.append('<p class="note">this release\'s eval.json has no trivial-answer panel (pass_rate_floor)</p>')
    else:
        out.append(f"<p>pass_rate_policy <b>{_fmt(m.get('pass_rate_policy'))}</b> against the best trivial answer "
                   f"(the floor) <b>{_fmt(floor)}</b>; a red tick above marks the floor.</p>")
        out.append(_table(["trivial answer", "pass rate"], [[n, v] for n, v in panel]))
    deg = [[k, m.get(k)] for k in ("degenerate_rate_base", "degenerate_rate_policy") if k in m]
    deg += [[k, v] for k, v in sorted(m.items()) if k.startswith("degenerate_") and [k, v] not in deg]
    out.append("<h3>Degenerate answers (empty, truncated, repeated)</h3>")
    out.append(_table(["measure", "rate"], deg) if deg else '<p class="note">no degeneration rates in eval.json</p>')
    rest = [[k, v] for k, v in sorted(m.items()) if not k.endswith(("_ci_low", "_ci_high")) and
            not k.startswith(("panel_", "degenerate_"))]
    out.append("<h3>Every number in eval/eval.json</h3>" + _table(["key", "value"], rest))
    return "".join(out)


def data_counts_html(manifest: dict[str, Any], data: dict[str, Any] | None) -> str:
    rows = []
    for stage, rec in (manifest.get("lineage") or {}).items():
        for art in rec.get("outputs", []):
            if art.get("rows") is not None:
                rows.append([stage, art["path"], art["rows"]])
    out = ["<h3>Rows each stage wrote (lineage records)</h3>",
           _table(["stage", "output", "rows"], rows) if rows else '<p class="note">no row counts recorded</p>']
    if data:
        out.append("<h3>Every row accounted for (eval/data.json)</h3>")
        out.append(_table(["count", "rows"], [[k, v] for k, v in data.items()]))
    return "".join(out)


def licenses_html(lic: dict[str, Any]) -> str:
    inputs = [[i.get("role"), i.get("name"), i.get("license"), i.get("kind")] for i in lic.get("inputs") or []]
    return (f"<p>release license <b>{_fmt(lic.get('release'))}</b>; dataset <b>{_fmt(lic.get('dataset'))}</b>; "
            f"derived from the inputs <b>{_fmt(lic.get('derived'))}</b>"
            + (f"; override {_fmt(lic.get('override'))}" if lic.get("override") else "") + "</p>"
            + _table(["role", "input", "license", "kind"], inputs)
            + ("".join(f"<p class='s-fail'>conflict: {escape(str(c))}</p>" for c in lic.get("conflicts") or [])))


def sweep_html(manifest: dict[str, Any], model: Path) -> str:
    entry = manifest.get("sweep")
    if not entry:
        return '<p class="note">no sweep in this release (one training run)</p>'
    from pipeline.release.sweep_release import BUNDLE_DIR, TABLE

    path = model / entry.get("table", f"{BUNDLE_DIR}/{TABLE}")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f'<p class="s-fail">the sweep table {escape(str(path.name))} is unreadable: {escape(str(e))}</p>'
    rule, win = table.get("rule") or {}, table.get("winner") or {}
    metric = rule.get("metric")
    rows = [[c.get("config_index"), json.dumps(c.get("config"), sort_keys=True), (c.get("mean") or {}).get(metric),
             (c.get("std") or {}).get(metric), c.get("p_vs_base_holm"),
             "picked" if c.get("config_index") == win.get("config_index") else ""] for c in table.get("configs") or []]
    return (f"<p>rule: {escape(str(rule.get('goal')))} <code>{escape(str(metric))}</code> on dev prompts over seeds "
            f"{escape(str(table.get('seeds')))}; picked configuration {_fmt(win.get('config_index'))}</p>"
            + _table(["#", "configuration", f"mean {metric}", "seed std", "p vs base (Holm)", ""], rows))


def render(report, target: str, model: Path, note: str | None = None) -> str:
    """The whole page for an AuditReport (pipeline.release.audit) of the release whose model folder is `model`;
    `note` (trusted HTML) is shown above the verdict."""
    from pipeline.core.io import read_json
    from pipeline.release.audit import to_json

    j = to_json(report, target)
    m = report.manifest or {}

    def load(rel: str) -> Any:
        p = model / rel
        return read_json(p) if p.is_file() else None
    a = j["anchor"]
    anchor = (escape(a["description"]) if a["verified"] else
              f"NOT verified: no trust anchor given; the key inside the release has sha256 "
              f"<code>{escape(str(a['key_sha256']))}</code>")
    scope = "" if j["scope"]["dataset"] else " The dataset was NOT checked (model-only download)."
    head = {"passed": "AUDIT PASSED", "failed": "AUDIT FAILED", "unanchored": "AUDIT INCOMPLETE"}[j["verdict"]]
    checks = [[_status(c["status"]), escape(c["name"]), escape(c["detail"])] for c in j["checks"]]
    gates = [[_status(str(g.get("status"))), escape(str(g.get("name"))), escape(str(g.get("detail")))]
             for g in m.get("gates") or []]
    rel = j["release"] or {}
    body = [
        f"<h1>open-release {escape(str(rel.get('version')))}</h1>",
        f'<p class="note">model {escape(str(rel.get("model_repo")))} · dataset {escape(str(rel.get("dataset_repo")))}'
        f' · code commit <code>{escape(str(rel.get("commit")))}</code>{" (dirty tree)" if rel.get("dirty") else ""}'
        f' · built {escape(str(rel.get("created_at")))} · audited target {escape(target)}</p>',
        f'<p class="verdict unanchored">{note}</p>' if note else "",
        f'<div class="verdict {j["verdict"]}">{head}: {len(j["problems"])} problem(s).{scope}<br>'
        f'signer: {anchor}</div>',
        "<h2>Checks</h2>", _table(["status", "check", "detail"], checks, raw=True),
        "<h2>Lineage</h2>", lineage_svg(j["lineage"]),
        "<h2>Release gates</h2>", _table(["outcome", "gate", "detail"], gates, raw=True),
        "<h2>Evaluation</h2>", evaluation_html(load("eval/eval.json")),
        "<h2>Data</h2>", data_counts_html(m, load("eval/data.json")),
        "<h2>Licenses</h2>", licenses_html(m.get("license") or {}),
        "<h2>Sweep</h2>", sweep_html(m, model),
        f'<p class="note">made by openrelease report (audit schema {escape(j["schema_version"])})</p>',
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>open-release {escape(str(rel.get('version')))}: audit report</title>"
            f"<style>{_CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.release import audit as A

    if args.dataset and args.model:
        raise A.AuditUsageError("give --dataset or --model, not both")
    clone = args.clone or (Path.cwd() if (Path.cwd() / ".git").exists() else None)
    anchor = A.Anchor(public_key=args.public_key, repo_key=args.repo_key, clone=clone, identity=args.identity,
                      issuer=args.issuer, trust_config=args.sigstore_trust_config)
    with tempfile.TemporaryDirectory(prefix="openrelease-report-") as tmp:
        target, model_dir = args.target, None
        if not Path(target).exists() and A._is_repo_id(target) and args.model is None:
            endpoint = (args.endpoint or "https://huggingface.co").rstrip("/")
            A._download(endpoint, target, "model", args.revision or "main", Path(tmp) / MODEL_DIR)
            model_dir = Path(tmp) / MODEL_DIR
            if not (model_dir / MANIFEST_FILE).is_file():
                raise AuditError(f"{target}: no {MANIFEST_FILE}: not an open-release repo")
            if args.dataset and Path(args.dataset).is_dir():  # a dataset already downloaded
                report = A.check_bundle(model_dir, args.public_key, clone, dataset_dir=Path(args.dataset), anchor=anchor)
            else:
                ds = (json.loads((model_dir / MANIFEST_FILE).read_text()).get("repos") or {}).get(DATASET_DIR) or {}
                A._download(endpoint, args.dataset or ds.get("repo_id", ""), "dataset", ds.get("revision", "main"),
                            Path(tmp) / DATASET_DIR)
                report = A.check_bundle(Path(tmp), args.public_key, clone, anchor=anchor)
        else:
            report = A.audit(target, args.public_key, args.revision, args.endpoint, clone, anchor,
                             dataset=args.dataset, model=args.model)
            base = Path(args.model) if args.model and Path(args.model).exists() else Path(target)
            model_dir = base / MODEL_DIR if (base / MODEL_DIR / MANIFEST_FILE).is_file() else base
        Path(args.out).write_text(render(report, target, model_dir), encoding="utf-8")
    code = A.exit_code(report)
    print(f"{args.out}: audit {A.verdict(report)} (exit {code}), {len(report.checks)} checks")
    return code


def register_cli(sub) -> None:
    p = sub.add_parser("report", help="write the audit and the release's facts as one self-contained HTML file",
                       description="Audits RELEASE exactly as `openrelease audit` does (same anchors, same exit "
                                   "codes) and writes one offline HTML page.")
    p.add_argument("target", help="a bundle folder, a model download folder or a Hub model repo id")
    p.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    p.add_argument("--public-key", type=Path, default=None, help="a PEM public key you obtained independently")
    p.add_argument("--repo-key", action="store_true", help="the key committed in the code repository at the tag")
    p.add_argument("--identity", default=None, help="keyless Sigstore signer identity")
    p.add_argument("--issuer", default=None, help="keyless Sigstore OIDC issuer")
    p.add_argument("--sigstore-trust-config", type=Path, default=None, help="an offline Sigstore trust root")
    p.add_argument("--clone", type=Path, default=None, help="a clone of the code repository")
    p.add_argument("--dataset", default=None, metavar="FOLDER|REPO", help="the dataset that goes with a model download")
    p.add_argument("--model", default=None, metavar="FOLDER|REPO", help="the model when the target is a dataset download")
    p.add_argument("--revision", default=None, help="Hub revision; default main")
    p.add_argument("--endpoint", default=None, help="Hub URL")
    p.set_defaults(func=_cmd_report)
