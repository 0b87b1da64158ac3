"""What every reader shares: opening a source as (position, record) pairs, and building normalised rows.

A source is a local file (.jsonl, .jsonl.gz, .json holding an array or JSON lines, .json.gz, .parquet) or
a Hugging Face dataset `hf://datasets/<id>@<commit>`. Positions are the 1-based line for text files
(for a JSON array: the line where the element starts) and the 0-based row index for Parquet and Hub
datasets. Every problem is a DataError naming the file, the position, the rule and a short excerpt.

A normalised row (one prompt group) is:
`{"id", "source", "source_file", "source_line", "license", "record_sha256": [sha256, ...],
  "prompt": [{"role", "content"}, ...],
  "completions": [{"content", "generator", "ratings": {aspect: float | None}, "finished": bool | None}, ...]}`;
`record_sha256` names the raw records the row was made from (pipeline.data.takedowns.record_sha256).
`finished` says whether the generator ended the completion itself (false: cut at its max_new_tokens);
it is null where the source does not say, which is every external format: their records carry no such
flag (UltraFeedback's own export included), and guessing a cut from the text would be a rule, not a fact.
A reader given a TakedownFilter (`exclude`) never sees the records it drops.
Readers check structure and types only; content rules (blank text, role order, rating range) are
the `validate` stage's, so a reader never judges what a row says, only whether it can be read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError, SourceError
from pipeline.core.io import iter_jsonl, open_text
from pipeline.data.takedowns import record_sha256

# ingest writes the normalised rows here inside `paths.ingested`; validate reads them.
ROWS_FILE = "rows.jsonl"
HF_PREFIX = "hf://datasets/"
UNKNOWN_GENERATOR = "unknown"
_HF = re.compile(r"^hf://datasets/(?P<id>[^@]+)@(?P<rev>[0-9a-f]{40})$")
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "system": "system"}


def excerpt(value: Any, n: int = 80) -> str:
    """A short, single-line repr of a value for error messages."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return repr(text[:n] + ("..." if len(text) > n else ""))


def bad(path: str | Path, where: int | str | None, rule: str, detail: str, source: str | None = None) -> DataError:
    """A DataError whose rule names the source (when known)."""
    return DataError(path, where, f"[{source}] {rule}" if source else rule, detail)


def iter_records(path: str, source_cfg: Any = None, exclude: Any = None) -> Iterator[tuple[int, dict]]:
    """Yield (position, record) for every record of a source, lazily where the format allows; records
    `exclude` (a pipeline.data.takedowns.TakedownFilter) drops are skipped before any reader parses them,
    keeping the positions of the others."""
    if exclude:
        yield from ((w, r) for w, r in iter_records(path, source_cfg) if not exclude.drop(r))
        return
    if path.startswith("hf://"):
        yield from _iter_hub(path, getattr(source_cfg, "split", None))
        return
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{path}: source file does not exist")
    name = p.name.lower()
    if name.endswith(".parquet"):
        yield from _iter_parquet(p)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from iter_jsonl(p)
    elif name.endswith((".json", ".json.gz")):
        yield from _iter_json_file(p)
    else:
        raise SourceError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz, .json, .json.gz or .parquet)")


def _iter_json_file(path: Path) -> Iterator[tuple[int, dict]]:
    """A .json file holds either one array of objects or JSON lines; tell them apart by the first byte."""
    try:
        with open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(path, None, "UTF-8 encoding", f"undecodable byte at offset {e.start}") from None
    except (OSError, EOFError) as e:
        raise DataError(path, None, "readable file", str(e)) from None
    start = len(text) - len(text.lstrip())
    if start == len(text) or text[start] != "[":
        yield from iter_jsonl(path)
        return
    yield from _iter_json_array(path, text, start)


def _iter_json_array(path: Path, text: str, pos: int) -> Iterator[tuple[int, dict]]:
    """Decode a JSON array element by element so each element gets the line it starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        if pos >= len(text):
            raise DataError(path, line_at(len(text)), "valid JSON", "the array is not closed with ']'")
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, "valid JSON", f"{e.msg} at column {e.colno}") from None
        where = line_at(pos)
        if not isinstance(obj, dict):
            raise DataError(path, where, "JSON object per array element", f"got {type(obj).__name__}: {excerpt(obj)}")
        yield where, obj
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataError(path, line_at(min(pos, len(text))), "valid JSON", "expected ',' or ']' between array elements")


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, "readable Parquet", str(e).splitlines()[0]) from None
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield index, record
            index += 1


def _iter_hub(path: str, split: str | None) -> Iterator[tuple[int, dict]]:
    m = _HF.match(path)
    if not m:
        raise SourceError(f"{path}: a Hub source is hf://datasets/<id>@<40-hex commit>")
    import datasets
    from datasets.exceptions import DatasetsError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        ds = datasets.load_dataset(m["id"], revision=m["rev"], split=split or "train")
    except (DatasetsError, HfHubHTTPError, LocalEntryNotFoundError, ConnectionError, OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set: the Hub is not contacted)" if _offline() else ""
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"{path}: cannot load dataset {m['id']}@{m['rev']} split "
                          f"{split or 'train'}{offline}: {first}") from None
    yield from enumerate(ds)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def row_id(source: str, record: dict, where: int) -> str:
    """`<source>:<record id>` when the record carries a string or int `id`, else `<source>:<position>`."""
    rid = record.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
        return f"{source}:{rid}"
    return f"{source}:{where}"


def make_row(source_cfg: Any, path: str, where: int, record: dict, prompt: list[dict],
             completions: list[dict], records: list[dict] | None = None) -> dict:
    """A normalised row; `records` are all the raw records it was made from when more than `record`."""
    return {"id": row_id(source_cfg.name, record, where), "source": source_cfg.name, "source_file": str(path),
            "source_line": where, "license": source_cfg.license,
            "record_sha256": [record_sha256(r) for r in (records or [record])], "prompt": prompt,
            "completions": completions}


def completion(content: str, generator: str | None, ratings: dict[str, float | None],
               finished: bool | None = None) -> dict:
    return {"content": content, "generator": generator or UNKNOWN_GENERATOR, "ratings": ratings, "finished": finished}


def require(record: dict, key: str, kinds: type | tuple[type, ...], path: str, where: int, source: str) -> Any:
    """record[key], which must exist and be of `kinds`; else a DataError naming the key."""
    if key not in record:
        raise bad(path, where, "required key", f"missing key {key!r}; keys are {sorted(record)[:12]}", source)
    value = record[key]
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise bad(path, where, "value type", f"{key!r} must be {names}, got {type(value).__name__}: "
                  f"{excerpt(value)}", source)
    return value


def messages(value: Any, what: str, path: str, where: int, source: str) -> list[dict]:
    """A list of {role, content} messages (or {from, value}); roles are normalised (human -> user, gpt -> assistant).

    Unknown roles are kept as written: whether the conversation is well-formed is validate's rule.
    """
    if not isinstance(value, list):
        raise bad(path, where, "value type", f"{what} must be a list of messages, got {type(value).__name__}: "
                  f"{excerpt(value)}", source)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad(path, where, "value type", f"{what}[{i}] must be an object, got {type(m).__name__}", source)
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise bad(path, where, "message shape", f"{what}[{i}] needs string role/content (or from/value): "
                      f"{excerpt(m)}", source)
        out.append({"role": _ROLE_ALIASES.get(role.strip().lower(), role), "content": content})
    return out


def rating(value: Any, aspect: str, path: str, where: int, source: str) -> float | None:
    """A rating as float; "N/A", "" and null are None (the aspect does not apply)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, str):
        s = value.strip()
        if s.upper() in ("N/A", "NA", ""):
            return None
        try:
            return float(s)
        except ValueError:
            pass
    raise bad(path, where, "rating is a number or N/A", f"{aspect}: {excerpt(value)}", source)


def arrow_schema():
    """The Arrow schema of validated rows (Parquet). Ratings become a list of {aspect, value} so that
    sources with different aspects share one schema."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    rating_t = pa.struct([("aspect", pa.string()), ("value", pa.float64())])
    completion_t = pa.struct([("content", pa.string()), ("generator", pa.string()),
                              ("ratings", pa.list_(rating_t)), ("finished", pa.bool_())])
    return pa.schema([("id", pa.string()), ("source", pa.string()), ("source_file", pa.string()),
                      ("source_line", pa.int64()), ("license", pa.string()), ("prompt", pa.list_(message)),
                      ("completions", pa.list_(completion_t)), ("record_sha256", pa.list_(pa.string()))])


def rows_to_arrow(rows: list[dict]):
    """Normalised rows as an Arrow table of `arrow_schema()`, built column by column (nested
    `Table.from_pylist` is several times slower). Raises KeyError / TypeError / pyarrow.ArrowException
    when a row does not have the normalised shape."""
    import pyarrow as pa

    ids, sources, files, lines, licenses, shas = [], [], [], [], [], []
    p_off, p_role, p_content = [0], [], []
    c_off, c_content, c_gen, c_fin = [0], [], [], []
    r_off, r_aspect, r_value = [0], [], []
    for row in rows:
        ids.append(row["id"])
        sources.append(row["source"])
        files.append(row["source_file"])
        lines.append(row["source_line"])
        licenses.append(row["license"])
        # rows written before record hashes existed (or by hand in tests) carry none; the audit refuses
        # to certify a takedown over pairs without them
        shas.append(row.get("record_sha256") or [])
        for m in row["prompt"]:
            p_role.append(m["role"])
            p_content.append(m["content"])
        p_off.append(len(p_role))
        for c in row["completions"]:
            c_content.append(c["content"])
            c_gen.append(c["generator"])
            fin = c.get("finished")  # rows written before the flag existed carry none: unknown
            if fin is not None and not isinstance(fin, bool):
                raise TypeError(f"finished is {type(fin).__name__}, not a boolean or null")
            c_fin.append(fin)
            for a, v in sorted(c["ratings"].items()):
                if isinstance(v, bool):
                    raise TypeError(f"rating {a} is a boolean")
                r_aspect.append(a)
                r_value.append(v)
            r_off.append(len(r_aspect))
        c_off.append(len(c_content))
    string, i32 = pa.string(), pa.int32()
    prompt = pa.ListArray.from_arrays(pa.array(p_off, i32), pa.StructArray.from_arrays(
        [pa.array(p_role, string), pa.array(p_content, string)], names=["role", "content"]))
    ratings = pa.ListArray.from_arrays(pa.array(r_off, i32), pa.StructArray.from_arrays(
        [pa.array(r_aspect, string), pa.array(r_value, pa.float64())], names=["aspect", "value"]))
    completions = pa.ListArray.from_arrays(pa.array(c_off, i32), pa.StructArray.from_arrays(
        [pa.array(c_content, string), pa.array(c_gen, string), ratings, pa.array(c_fin, pa.bool_())],
        names=["content", "generator", "ratings", "finished"]))
    cols = [pa.array(ids, string), pa.array(sources, string), pa.array(files, string), pa.array(lines, pa.int64()),
            pa.array(licenses, string), prompt, completions, pa.array(shas, pa.list_(string))]
    return pa.Table.from_arrays(cols, schema=arrow_schema())
