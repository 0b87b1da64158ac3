"""What an HTML page or stylesheet would fetch from the network when opened: the test of "offline".

A page is offline when no element that loads something (script, stylesheet, image, frame, media, icon)
and no CSS `url()` / `@import` points at another host. Links a reader may click (`<a href>`) and forms
load nothing by themselves, so they do not count.
"""

from __future__ import annotations

import re
from pathlib import Path

# an absolute or protocol-relative URL
_REMOTE = r"(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//[^\"'\s>)]+"
_LOADING_TAG = re.compile(
    r"<(?:script|link|img|iframe|frame|embed|object|source|video|audio|track|input)\b[^>]*?"
    r"\b(?:src|href|data|srcset|poster)\s*=\s*[\"']?(" + _REMOTE + ")", re.IGNORECASE)
_CSS_URL = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"'])(" + _REMOTE + ")", re.IGNORECASE)


def external_loads(text: str) -> list[str]:
    """Every remote URL that `text` (HTML or CSS) would load, in order of appearance, without repeats."""
    found = [m.group(1) for m in _LOADING_TAG.finditer(text)] + [m.group(1) for m in _CSS_URL.finditer(text)]
    return [u for u in dict.fromkeys(found) if not u.lower().startswith(("data:", "http://www.w3.org/"))]


def folder_external_loads(folder: Path) -> dict[str, list[str]]:
    """{relative path: remote URLs} for every .html / .htm / .css file under `folder` that loads any."""
    out: dict[str, list[str]] = {}
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix.lower() in (".html", ".htm", ".css"):
            urls = external_loads(f.read_text(encoding="utf-8", errors="replace"))
            if urls:
                out[f.relative_to(folder).as_posix()] = urls
    return out
