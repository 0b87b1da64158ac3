"""Hashing, lineage records and atomic outputs."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_dir, atomic_write_json, iter_jsonl, read_json
from pipeline.core.lineage import Artifact, LineageRecord, git_state, sha256_file, sha256_json, sha256_path


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * (3 << 20) + b"tail")  # several read chunks
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_folder_digest_depends_on_names_and_contents(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    first = sha256_path(d)
    (d / "sub" / "b.txt").write_text("B")
    assert sha256_path(d) != first
    (d / "sub" / "b.txt").write_text("b")
    assert sha256_path(d) == first
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert sha256_path(d) != first


def test_hidden_temporaries_do_not_change_folder_digest(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("a")
    before = sha256_path(d)
    (d / ".a.txt.123.tmp").write_text("partial")
    assert sha256_path(d) == before


def test_sha256_json_is_canonical():
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_artifact_of_folder_lists_files(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "x.json").write_text("{}")
    art = Artifact.of(d, rows=3, root=tmp_path)
    assert art.path == "out"
    assert art.rows == 3
    assert art.files == {"x.json": sha256_file(d / "x.json")}
    assert art.size == 2


def test_record_roundtrip(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"a": 1}\n')
    rec = LineageRecord(stage="s", params={"k": 1}, params_digest=sha256_json({"k": 1}),
                        inputs=[Artifact.of(f, rows=1, root=tmp_path)])
    atomic_write_json(tmp_path / "s.json", rec.to_dict())
    back = LineageRecord.from_dict(read_json(tmp_path / "s.json"))
    assert back == rec
    assert back.versions["torch"].startswith("2.13")


def test_git_state_outside_repo(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert (out / "w.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert (out / "w.bin").read_bytes() == b"1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries left behind


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.core.io.os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_iter_jsonl_names_bad_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DataError, match=r"rows.jsonl:3: valid JSON"):
        list(iter_jsonl(f))


def test_iter_jsonl_rejects_non_objects_and_bad_encoding(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: JSON object per line"):
        list(iter_jsonl(f))
    g = tmp_path / "latin.jsonl"
    g.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: UTF-8 encoding"):
        list(iter_jsonl(g))
