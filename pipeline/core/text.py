"""Text normalisation shared by the data wing (exact-duplicate prompt hashes) and `openrelease trace`
(matching a record by its text), so both call the same two texts equal."""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
