"""Great Expectations Data Docs that render offline.

GX 1.x writes pages that load jQuery, Bootstrap, bootstrap-table, Font Awesome, Vega and its logo from
CDNs; opened without a network the index is unstyled and its validation list empty ("$ is not
defined"). `make_offline` copies local copies of those files (`datadocs_vendor/`, byte for byte from
their npm packages: `assets.json` names each one with its sha256, `LICENSES.md` their licenses) into
the site's `static/vendor/`, points every page at them by relative path, and points GX's logo at the
copy GX already ships in `static/images/`. A page that still loads anything remote afterwards (a GX
upgrade that names a new CDN file) is an error naming the page and the URL, never a silent gap.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from pipeline.core.offline import folder_external_loads

VENDOR = Path(__file__).with_name("datadocs_vendor")
ASSETS_FILE = "assets.json"
SITE_VENDOR = ("static", "vendor")
# GX's logo URLs -> the image GX's own static folder holds (its dark-theme logo is not shipped with
# GX, so the light one stands in for it)
_GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
_LOGOS = {_GX_IMAGES + "logo-long.png": "logo-long.png", _GX_IMAGES + "full_logo_dark.png": "logo-long.png"}
# GX pins some CDN files with Subresource Integrity; a file:// page cannot make the CORS request SRI
# needs, so the attributes go, after the local copy is checked against the digest they name.
_SRI = re.compile(r'\s+integrity="(sha(?:256|384|512))-([A-Za-z0-9+/=]+)"(?:\s+crossorigin="[^"]*")?')
_TAG = re.compile(r"<(?:script|link)\b[^>]*>")


def vendored_assets() -> list[dict]:
    """The vendored files: {url (null: loaded by a vendored stylesheet), path, npm, license, sha256}."""
    return json.loads((VENDOR / ASSETS_FILE).read_text(encoding="utf-8"))["files"]


def _rel(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target, page_dir)).as_posix()


def _drop_sri(tag: str, page: Path) -> str:
    """The tag without integrity/crossorigin, once the local file it loads has the digest it names."""
    m = _SRI.search(tag)
    src = re.search(r'(?:src|href)="([^"]+)"', tag)
    if not m or not src or "//" in src.group(1):
        return tag
    local = (page.parent / src.group(1)).resolve()
    digest = base64.b64encode(hashlib.new(m.group(1), local.read_bytes()).digest()).decode()
    if digest != m.group(2):
        raise RuntimeError(f"{local}: its {m.group(1)} is {digest}, not the {m.group(2)} that {page.name} pins")
    return tag[:m.start()] + tag[m.end():]


def make_offline(docs_dir: Path) -> None:
    """Rewrite the Data Docs site in `docs_dir` to load only files inside it. Raises RuntimeError when a
    page still loads something remote."""
    docs_dir = Path(docs_dir)
    vendor = docs_dir.joinpath(*SITE_VENDOR)
    shutil.copytree(VENDOR, vendor, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    urls = {a["url"]: vendor / a["path"] for a in vendored_assets() if a["url"]}
    images = docs_dir / "static" / "images"
    for page in sorted([*docs_dir.rglob("*.html"), *docs_dir.joinpath("static", "styles").glob("*.css")]):
        text = page.read_text(encoding="utf-8")
        new = text
        for url, local in urls.items():
            for q in ('"', "'"):
                new = new.replace(f"{q}{url}{q}", f"{q}{_rel(local, page.parent)}{q}")
        new = _TAG.sub(lambda m, page=page: _drop_sri(m.group(0), page), new)
        for url, name in _LOGOS.items():
            new = new.replace(url, _rel(images / name, page.parent))
        if new != text:
            page.write_text(new, encoding="utf-8")
    remote = folder_external_loads(docs_dir)
    if remote:
        first = next(iter(remote))
        raise RuntimeError(f"Data Docs in {docs_dir} still load {len(sum(remote.values(), []))} remote file(s), "
                           f"e.g. {first}: {remote[first][0]}; add it to {VENDOR / ASSETS_FILE} (see its note)")
