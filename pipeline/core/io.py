"""Atomic writes and line-numbered reading.

Outputs are written to a temporary sibling and renamed into place only on success, so a crash or
Ctrl-C never leaves a half-written file or folder that DVC could cache.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    old = None
    if path.exists():
        # Two renames keep the window without a complete `path` as short as possible.
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def open_text(path: Path):
    """Text of a (gzipped) UTF-8 file; a leading byte-order mark (Windows exports) is dropped."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="strict", newline="")
    return open(path, encoding="utf-8-sig", errors="strict", newline="")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; any bad line is a DataError with file:line.

    Harmless variations read as the same rows: a UTF-8 byte-order mark, CRLF line ends, blank lines
    (a blank last line included)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file exists", "no such file")
    lineno = 0
    try:
        with _open_binary(path) as f:
            # Decode line by line so an encoding error names its own line, not a buffer's.
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, lineno, "UTF-8 encoding", f"undecodable byte at column {e.start + 1}") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, lineno, "valid JSON", f"{e.msg} at column {e.colno}: {line[:80]!r}") from None
                if not isinstance(obj, dict):
                    raise DataError(path, lineno, "JSON object per line", f"got {type(obj).__name__}: {line[:80]!r}")
                yield lineno, obj
    except (OSError, EOFError) as e:  # gzip truncation and friends
        raise DataError(path, lineno + 1, "readable file", str(e)) from None


def read_json(path: str | Path) -> Any:
    """Read one JSON document; errors name the file, the line and column."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file exists", "no such file")
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, "valid JSON", f"{e.msg} at column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, "UTF-8 encoding", f"undecodable byte at offset {e.start}") from None


def write_parquet(table, rows: Any, columns, path: Path, chunk: int = 50_000) -> None:
    """The given rows and columns of an Arrow table (memory-mapped) to one Parquet file, chunk by chunk so
    memory stays flat. pyarrow's writer is deterministic: same table, same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table.select(list(columns))
    with pq.ParquetWriter(path, table.schema) as writer:
        for s in range(0, len(rows), chunk):
            writer.write_table(table.take(pa.array(rows[s : s + chunk], pa.int64())))
        if len(rows) == 0:
            writer.write_table(table.schema.empty_table())


def config_dtype_name(cfg: dict[str, Any]) -> str | None:
    """The dtype a model's config.json names (transformers 5.x `dtype`, 4.x `torch_dtype`), without a
    `torch.` prefix."""
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(d).removeprefix("torch.") if d else None
