"""The chat template lock: `base_model` records the template's sha256, every stage that tokenizes
conversations checks it.

The most reported DPO bugs are template mismatches (a different template in training and evaluation,
double BOS/EOS). `base_model` writes `chat_template_sha256` and the rendering of a probe conversation
into `SOURCE.json`; `generate`, `build`, `train` and `evaluate` call `check_template` on the tokenizer
they use, and a mismatch stops the stage with one line naming both hashes and where the two renderings
of the probe part.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import SourceError
from pipeline.core.lineage import sha256_bytes

SOURCE_FILE = "SOURCE.json"
PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def template_text(tokenizer) -> str:
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # several named templates: the default one renders chats
        text = text.get("default")
    if not isinstance(text, str) or not text:
        raise SourceError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template")
    return text


def template_sha256(tokenizer) -> str:
    return sha256_bytes(template_text(tokenizer).encode("utf-8"))


def render_probe(tokenizer) -> str:
    return tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)


def template_record(tokenizer) -> dict[str, str]:
    """What `base_model` writes into SOURCE.json."""
    return {"chat_template_sha256": template_sha256(tokenizer), "chat_template_probe": render_probe(tokenizer)}


def recorded(base_dir: str | Path) -> dict[str, str]:
    """The template record of a base model folder; an error when base_model did not write one."""
    path = Path(base_dir) / SOURCE_FILE
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        source = {}
    if not isinstance(source, dict) or "chat_template_sha256" not in source:
        raise SourceError(f"{path}: no chat_template_sha256 recorded (rerun `dvc repro base_model`)")
    return {k: source[k] for k in ("chat_template_sha256", "chat_template_probe") if k in source}


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at char {i}: {a[max(0, i - 10):i + 30]!r} vs {b[max(0, i - 10):i + 30]!r}"


def check_template(tokenizer, base_dir: str | Path, what: str) -> str:
    """Stop unless `tokenizer` (used by `what`) has the chat template base_model recorded; return its sha256."""
    want = recorded(base_dir)
    have = template_sha256(tokenizer)
    if have != want["chat_template_sha256"]:
        rendering = render_probe(tokenizer)
        where = _first_difference(want.get("chat_template_probe", ""), rendering)
        raise SourceError(f"{what}: chat template sha256 {have[:16]} differs from {want['chat_template_sha256'][:16]} "
                          f"recorded in {Path(base_dir) / SOURCE_FILE}; the probe renderings differ {where}")
    return have


def check_template_dir(tokenizer_dir: str | Path, base_dir: str | Path, what: str) -> str:
    from pipeline.lm.loading import load_tokenizer

    return check_template(load_tokenizer(tokenizer_dir), base_dir, what)

