"""Great Expectations Data Docs: they render offline (local copies of the CDN files GX names), name the data
asset, and travel in the release with the validation's run time; opened in headless chromium with the
network blocked (Debian's `chromium`, installed by .ci/run)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from pipeline.core.offline import external_loads, folder_external_loads
from pipeline.core.params import RowRules, load_params
from pipeline.data.datadocs import VENDOR, make_offline, vendored_assets
from pipeline.stages import validate
from tests.browser import chromium, console_errors, needs_browser
from tests.test_validate import SOURCES, good, write_rows

ASSET = "interim/ingested/rows.jsonl"
STARTED, FINISHED = "2026-12-06T13:05:58+00:00", "2026-12-06T13:06:08+00:00"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Real Data Docs from the validate stage's code over six rows, one of them quarantined."""
    tmp = tmp_path_factory.mktemp("docs")
    rows = [good(i) for i in range(1, 7)]
    rows[2]["completions"][0]["content"] = "   "
    write_rows(tmp / "rows.jsonl", rows)
    (tmp / "out").mkdir()
    rules = RowRules(**{r: "quarantine" for r in RowRules.model_fields})
    validate.run(tmp / "rows.jsonl", SOURCES, rules, 1.0, tmp / "out", tmp / "report", asset=ASSET)
    return tmp / "report" / "docs"


def _text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _run_page(folder):
    return next(folder.joinpath("validations").rglob("*.html"))


def test_vendored_files_are_the_npm_files_assets_json_names():
    assets = vendored_assets()
    licenses = (VENDOR / "LICENSES.md").read_text()
    assert assets and {a["path"].split("/")[0] for a in assets} <= set(re.findall(r"^\| (\S+)/ \|", licenses, re.M))
    for a in assets:
        assert hashlib.sha256((VENDOR / a["path"]).read_bytes()).hexdigest() == a["sha256"], a["path"]
        assert a["npm"] and a["license"]


def test_external_loads_counts_what_loads_not_what_links():
    page = ('<link rel="stylesheet" href="https://cdn.example.org/a.css"><script src="//cdn.example.org/b.js">'
            '</script><img src="static/x.png"><a href="https://example.org/docs">docs</a>'
            "<style>.x{background:url('https://cdn.example.org/c.png')}</style>")
    assert external_loads(page) == ["https://cdn.example.org/a.css", "//cdn.example.org/b.js",
                                     "https://cdn.example.org/c.png"]


def test_docs_load_nothing_remote_and_name_the_data_asset(docs):
    assert folder_external_loads(docs) == {}
    assert (docs / "static" / "vendor" / "jquery" / "jquery.min.js").is_file()
    run = _text(_run_page(docs).read_text())
    assert f"Data asset: {ASSET}" in run and "Data asset: None" not in run
    assert ASSET in (docs / "index.html").read_text()
    # the docs are a DVC output: a fixed run time, the real one is added in the release (below)
    assert "1970-01-01T00:00:00Z" in run


def test_the_offline_docs_are_the_same_bytes_on_a_second_run(docs, tmp_path):
    """They are a DVC output: the vendored copies and rewritten pages must not make two runs differ."""
    rows = docs.parent.parent / "rows.jsonl"
    (tmp_path / "out").mkdir()
    validate.run(rows, SOURCES, RowRules(**{r: "quarantine" for r in RowRules.model_fields}), 1.0, tmp_path / "out",
                 tmp_path / "report", asset=ASSET)
    again = tmp_path / "report" / "docs"
    files = sorted(p.relative_to(docs) for p in docs.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (docs / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_a_new_cdn_file_is_an_error_not_a_silent_gap(docs, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(docs, site)
    index = site / "index.html"
    index.write_text(index.read_text().replace("</head>", '<script src="https://cdn.example.org/new.js"></script></head>'))
    with pytest.raises(RuntimeError, match="cdn.example.org/new.js"):
        make_offline(site)


@needs_browser
def test_the_offline_browser_sees_a_page_that_needs_a_cdn(tmp_path):
    bad = tmp_path / "cdn.html"
    bad.write_text('<!DOCTYPE html><html><head><script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>'
                   "</head><body><script>$(function () {})</script></body></html>")
    assert any("$ is not defined" in ln for ln in console_errors(chromium("--dump-dom", url=bad.as_uri(), offline=True).stderr))


@needs_browser
def test_chromium_opens_the_index_offline_with_the_validation_list_filled(docs):
    for page in (docs / "index.html", _run_page(docs), docs / "expectations" / "rows.html"):
        out = chromium("--dump-dom", url=page.as_uri(), offline=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert console_errors(out.stderr) == [], page
    dom = chromium("--dump-dom", url=(docs / "index.html").as_uri(), offline=True).stdout
    # bootstrap-table (jQuery) builds the list's rows from the page's data: present only when the scripts ran
    rows = re.findall(r'<tr class="clickable-row" data-href="(validations/[^"]+)"', dom)
    assert rows and (docs / rows[0]).is_file()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir, docs):
    from pipeline.core.runs import write_run_record
    from pipeline.release.publish import dry_run
    from tests.release_fixture import make_release_project

    root = make_release_project(tmp_path_factory.mktemp("dd-release") / "proj", tiny_model_dir)
    p = load_params(root / "params.yaml")
    shutil.copytree(docs, root / p.paths.reports / "validation" / "docs")
    write_run_record(root / p.paths.runs, "validate", root / p.paths.lineage / "validate.json",
                     {"started_at": STARTED, "finished_at": FINISHED})
    return dry_run(p, root, root / "release").path


def _audit(path):
    from pipeline.release import audit

    return audit.check_bundle(path, public_key=path / "model" / "signing-key.pub")


def test_the_release_carries_the_docs_with_the_run_time_and_the_report(bundle):
    site = bundle / "dataset" / "reports" / "data_docs" / "validation"
    index, run = (site / "index.html").read_text(), _text(_run_page(site).read_text())
    assert "2026-12-06 13:05:58 UTC" in index and "1970-01-01 00:00:00" not in index
    assert "Run Time 2026-12-06T13:05:58Z" in run and "1970-01-01T00:00:00Z" not in run
    assert "during stage validate's run, 2026-12-06 13:05:58 to 13:06:08 UTC" in run
    manifest = json.loads((bundle / "model" / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]["dataset"]}
    assert "reports/data_docs/validation/index.html" in listed
    assert "reports/data_docs/validation/static/vendor/jquery/jquery.min.js" in listed
    assert "report.html" in {f["path"] for f in manifest["files"]["model"]}
    report = (bundle / "model" / "report.html").read_text()
    assert "written by the publish step" in report and "AUDIT INCOMPLETE" in report
    assert folder_external_loads(bundle) == {}
    result = _audit(bundle)
    assert result.problems == []
    offline = next(c for c in result.checks if c.name == "offline pages")
    assert offline.status == "passed" and "report.html, Data Docs" in offline.detail


def test_the_audit_fails_a_page_that_would_load_from_a_cdn(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    page = copy / "dataset" / "reports" / "data_docs" / "validation" / "index.html"
    page.write_text(page.read_text().replace("</head>", '<script src="https://cdn.example.org/x.js"></script></head>'))
    result = _audit(copy)
    failed = {c.name: c.detail for c in result.checks if c.status == "failed"}
    assert "cdn.example.org/x.js" in failed["offline pages"] and "dataset files" in failed


@needs_browser
def test_chromium_opens_the_releases_pages_offline(bundle):
    site = bundle / "dataset" / "reports" / "data_docs" / "validation"
    for page in (bundle / "model" / "report.html", site / "index.html", _run_page(site)):
        out = chromium("--dump-dom", url=page.as_uri(), offline=True)
        assert out.returncode == 0 and console_errors(out.stderr) == [], page
    dom = chromium("--dump-dom", url=(site / "index.html").as_uri(), offline=True).stdout
    assert "2026-12-06 13:05:58 UTC" in dom and 'class="clickable-row"' in dom
