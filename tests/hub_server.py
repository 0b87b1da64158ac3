"""A small Hugging Face Hub-compatible HTTP server for tests, on loopback, in memory.

Enough of the Hub API for the real `huggingface_hub`, `datasets` and `transformers` clients to create
repos, pre-upload, upload large files the way the real Hub takes them, commit atomically (all
operations or none), list refs, create tags (never overwriting one), list trees, answer paths-info,
report repo info, serve files and validate card metadata. Write calls need `Authorization: Bearer <token>`.

Large files travel the real Hub's LFS path (this client has no hf_xet, so not Xet): preupload answers
`lfs` for a file above LFS_THRESHOLD, a binary sample, or a path the repo's .gitattributes marks for
LFS; the client then asks the LFS batch API (`<repo>.git/info/lfs/objects/batch`) for upload actions,
PUTs the object (or its parts, then posts the completion, for files above `multipart_chunk`), calls
the verify action and commits an `lfsFile` entry naming the sha256. A commit whose lfsFile names an
object never uploaded, or that sends a large or binary file inline, is refused as the Hub refuses it.
Downloads of LFS files carry X-Linked-Etag (the sha256) and X-Linked-Size, and trees list their
`lfs` block. `/api/validate-yaml` runs the card checks in `card_checks.py`.
`fail_commits[repo_id] = n` makes the next n commits to that repo fail with HTTP 500, to test that a
failure midway leaves the Hub as it was.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from tests.hub_lfs import GITATTRIBUTES, LfsRoutes, lfs_pointer

_counter = itertools.count()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    message: str
    lfs: set[str] = field(default_factory=set)   # paths stored in LFS (the repo holds a pointer)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or rev
        return self.commits.get(oid)


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.fail_commits: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization scheme or None)
        self.lock = threading.Lock()
        self.lfs_objects: dict[str, bytes] = {}            # sha256 -> content, after upload + verify
        self.lfs_parts: dict[str, dict[int, bytes]] = {}   # multipart uploads in progress
        self.multipart_chunk = 64 * 1024 * 1024            # files above this go multipart (tests lower it)
        self.validations: list[tuple[str, list[str]]] = []  # (repo type, errors) per /api/validate-yaml call

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str,
                   lfs: set[str] | None = None) -> Commit:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"{repo.repo_id}\n{parent}\n{message}\n{next(_counter)}".encode())
        for p in sorted(files):
            h.update(p.encode() + blob_id(files[p]).encode())
        c = Commit(h.hexdigest(), parent, files, message, set(lfs or ()))
        repo.commits[c.oid] = c
        repo.branches["main"] = c.oid
        return c


TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class Handler(LfsRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"error": message}, headers={"X-Error-Message": message})

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _record(self):
        auth = self.headers.get("Authorization")
        self.state.requests.append((self.command, self.path, auth.split()[0] if auth else None))

    def _repo(self, kind: str, repo_id: str) -> Repo | None:
        return self.state.repos.get((TYPES.get(kind, kind), repo_id))

    # -- routes ----------------------------------------------------------------------------------
    def do_HEAD(self):
        self._record()
        self._resolve(head=True)

    def do_GET(self):
        self._record()
        path = urlparse(self.path).path
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(refs|tree|revision)(?:/([^/]+)(/.*)?)?)?", path)
        if not m:
            return self._resolve(head=False)
        kind, repo_id, what, rev, sub = m.groups()
        repo = self._repo(kind, repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
        if what == "refs":
            def ref(name, target, prefix):
                return {"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": target}
            return self._send(200, {"branches": [ref(b, t, "heads") for b, t in repo.branches.items()],
                                    "tags": [ref(b, t, "tags") for b, t in repo.tags.items()],
                                    "converts": [], "pullRequests": []})
        commit = repo.resolve(unquote(rev or "main"))
        if commit is None:
            return self._send(404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
        if what == "tree":
            prefix = (sub or "").strip("/")
            recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() == "true"
            names = [p for p in sorted(commit.files)
                     if (not prefix or p.startswith(prefix + "/")) and (recursive or "/" not in p[len(prefix) + 1 if prefix else 0:])]
            folders = sorted({f"{prefix + '/' if prefix else ''}{p[len(prefix) + 1 if prefix else 0:].split('/')[0]}"
                              for p in commit.files if (not prefix or p.startswith(prefix + "/"))
                              and "/" in p[len(prefix) + 1 if prefix else 0:]})
            if not recursive:
                names += [f for f in folders if f not in commit.files]
            if prefix and not names and prefix not in commit.files:
                return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
            return self._send(200, [self._entry(commit, p) for p in names]
                              + ([{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
                                 if recursive else []))
        return self._send(200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private,
                                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                                "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0})

    def _resolve(self, head: bool):
        path = unquote(urlparse(self.path).path)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._error(404, f"no route for {self.command} {path}")
        kind, repo_id, rev, file = m.groups()
        repo = self._repo(kind or "models", repo_id)
        commit = repo.resolve(rev) if repo else None
        if commit is None or file not in commit.files:
            return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"}, head=head)
        data = commit.files[file]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob_id(data)}"', "Content-Type": "application/octet-stream"}
        if file in commit.lfs:  # what the Hub answers for an LFS file (before its CDN redirect)
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers=headers, head=head)

    def _entry(self, commit: Commit, path: str) -> dict:
        """A tree / paths-info entry: a directory, a regular file, or an LFS file with its `lfs` block."""
        if path not in commit.files:
            return {"type": "directory", "oid": "0" * 40, "size": 0, "path": path}
        data = commit.files[path]
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            pointer = lfs_pointer(sha, len(data))
            return {"type": "file", "oid": blob_id(pointer), "size": len(data), "path": path,
                    "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)}}
        return {"type": "file", "oid": blob_id(data), "size": len(data), "path": path}

    def _paths_info(self, repo: Repo, rev: str, body: bytes):
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        commit = repo.resolve(rev)
        if commit is None:
            return self._send(404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
        dirs = {p.rsplit("/", i)[0] for p in commit.files for i in range(1, p.count("/") + 1)}
        return self._send(200, [self._entry(commit, p) for p in paths if p in commit.files or p in dirs])

    def do_POST(self):
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/validate-yaml":
            from tests.card_checks import check_card

            req = json.loads(body)
            errors = check_card(req.get("content", ""), req.get("repoType") or "model")
            self.state.validations.append((req.get("repoType") or "model", errors))
            if errors:  # the Hub answers 400 with the reasons as text (the client raises ValueError(text))
                return self._send(400, "\n".join(errors).encode(), headers={"Content-Type": "text/plain"})
            return self._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/paths-info/([^/]+)", path):
            kind, repo_id, rev = m.groups()
            repo = self._repo(kind, repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
            return self._paths_info(repo, unquote(rev), body)
        if path == "/lfs-verify":
            obj = json.loads(body)
            ok = obj["oid"] in self.state.lfs_objects and len(self.state.lfs_objects[obj["oid"]]) == obj["size"]
            return self._send(200, {}) if ok else self._error(404, f"LFS object {obj['oid'][:12]} was not uploaded")
        if m := re.fullmatch(r"/lfs-complete/([0-9a-f]{64})", path):
            with self.state.lock:
                return self._lfs_complete(m.group(1), body)
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        with self.state.lock:
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                if self._repo(m.group(1) or "models", m.group(2)) is None:
                    return self._send(404, {"error": "Repository not found"})
                return self._lfs_batch(body)
            m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit|tag)/([^/]+)", path)
            if not m:
                return self._error(404, f"no route for POST {path}")
            kind, repo_id, what, rev = m.groups()
            repo = self._repo(kind, repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
            rev = unquote(rev)
            if what == "preupload":
                files = json.loads(body)["files"]
                head = repo.resolve(rev)
                answers = []
                for f in files:
                    lfs = self.should_lfs(repo, f["path"], f["size"], base64.b64decode(f.get("sample", "")))
                    old = head.files.get(f["path"]) if head else None
                    oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else blob_id(old)
                    answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                    "shouldIgnore": False, "oid": oid})
                return self._send(200, {"files": answers})
            if what == "tag":
                tag = json.loads(body)["tag"]
                commit = repo.resolve(rev)
                if commit is None:
                    return self._send(404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
                if tag in repo.tags or tag in repo.branches:
                    return self._error(409, f"Tag {tag} already exists")
                repo.tags[tag] = commit.oid
                return self._send(200, {})
            return self._commit(repo, rev, body)

    def _create(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            return self._send(409, {"error": "You already created this repo", "url": url})
        repo = Repo(repo_id, repo_type, payload.get("visibility") == "private")
        self.state.repos[(repo_type, repo_id)] = repo
        self.state.new_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _commit(self, repo: Repo, rev: str, body: bytes):
        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
        header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
        if self.state.fail_commits.get(repo.repo_id, 0) > 0:
            self.state.fail_commits[repo.repo_id] -= 1
            return self._error(500, "Internal Error (injected by the test)")
        head_oid = repo.branches.get(rev)
        if header.get("parentCommit") and header["parentCommit"] != head_oid:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head_oid].files) if head_oid else {}
        lfs = set(repo.commits[head_oid].lfs) if head_oid else set()
        for ln in lines:  # applied to a copy: the branch moves only if every operation is valid
            key, value = ln["key"], ln.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "only base64 regular files are supported")
                data = base64.b64decode(value["content"])
                if self.should_lfs(repo, value["path"], len(data), data[:512]):
                    return self._error(400, f"Your push was rejected: {value['path']} must be stored with Git LFS")
                files[value["path"]] = data
                lfs.discard(value["path"])
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value.get("oid", ""))
                if data is None or value.get("algo") != "sha256":
                    return self._error(400, f"LFS object for {value['path']} was never uploaded")
                files[value["path"]] = data
                lfs.add(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, f"A file with this name doesn't exist: {value['path']}")
                del files[value["path"]]
                lfs.discard(value["path"])
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                lfs &= set(files)
            elif key == "copyFile":
                return self._error(400, f"{key} operations are not supported by this test server")
        commit = self.state.new_commit(repo, head_oid, files, header.get("summary", ""), lfs)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return self._send(200, {"commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                                "commitOid": commit.oid, "success": True})


class HubServer:
    """`with HubServer(token) as hub:` serves on http://127.0.0.1:<port> (`hub.url`) in a thread."""

    def __init__(self, token: str):
        self.state = HubState(token)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {}))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._httpd.RequestHandlerClass.state = self.state
        self._httpd.RequestHandlerClass.endpoint = self.url
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.state.repos.get((repo_type, repo_id))

    def files_at(self, repo_id: str, rev: str, repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(rev) if repo else None
        return dict(commit.files) if commit else {}
