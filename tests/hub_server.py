"""A small Hugging Face Hub-compatible HTTP server for tests, on loopback, in memory.

Enough of the Hub API for the real `huggingface_hub` client to create repos, pre-upload (every file
is answered "regular", so uploads go base64 inside the NDJSON commit, never the LFS or Xet route),
commit atomically (all operations or none), list refs, create tags (never overwriting one), list
trees, report repo info and serve files. Write calls need `Authorization: Bearer <token>`.
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

_counter = itertools.count()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    message: str


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

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> Commit:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"{repo.repo_id}\n{parent}\n{message}\n{next(_counter)}".encode())
        for p in sorted(files):
            h.update(p.encode() + blob_id(files[p]).encode())
        c = Commit(h.hexdigest(), parent, files, message)
        repo.commits[c.oid] = c
        repo.branches["main"] = c.oid
        return c


TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class Handler(BaseHTTPRequestHandler):
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
            items = [{"type": "file", "oid": blob_id(d), "size": len(d), "path": p}
                     for p, d in sorted(commit.files.items())
                     if (not prefix or p.startswith(prefix + "/")) and (recursive or "/" not in p[len(prefix) + 1 if prefix else 0:])]
            return self._send(200, items)
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
        self._send(200, data, headers={"X-Repo-Commit": commit.oid, "ETag": f'"{blob_id(data)}"',
                                       "Content-Type": "application/octet-stream"}, head=head)

    def do_POST(self):
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        with self.state.lock:
            if path == "/api/repos/create":
                return self._create(json.loads(body))
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
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": blob_id(head.files[f["path"]]) if head and f["path"] in head.files else None}
                    for f in files]})
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
        self.state.new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                              "initial commit")
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
        for ln in lines:  # applied to a copy: the branch moves only if every operation is valid
            key, value = ln["key"], ln.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "only base64 regular files are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, f"A file with this name doesn't exist: {value['path']}")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key in ("lfsFile", "copyFile"):
                return self._error(400, f"{key} operations are not supported by this test server")
        commit = self.state.new_commit(repo, head_oid, files, header.get("summary", ""))
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
