"""The Hub's large-file route for the loopback server: which files go to LFS, the LFS batch API, the
PUT (or multipart) upload and its completion. Mixed into tests.hub_server.Handler."""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlparse

LFS_THRESHOLD = 10 * 1024 * 1024   # the Hub stores files above 10 MB in LFS whatever .gitattributes says
# The patterns of the .gitattributes the Hub writes into a new repo (the LFS-relevant subset).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.parquet", "*.arrow",
                "*.tar.*", "*.tar", "*.tgz", "*.gz", "*.zip", "*.zst", "*.png", "*.jpg", "*.npy", "*.npz", "*.pkl",
                "*.model", "*.msgpack")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class LfsRoutes:
    """Handler methods for LFS; `self` is the request handler (state, endpoint, _send, _error, _body)."""

    def should_lfs(self, repo, path: str, size: int, sample: bytes) -> bool:
        from fnmatch import fnmatch

        head = repo.resolve("main")
        attrs = (head.files.get(".gitattributes", b"") if head else b"").decode(errors="replace")
        patterns = [ln.split()[0] for ln in attrs.splitlines() if "filter=lfs" in ln]
        name = path.rsplit("/", 1)[-1]
        return size > LFS_THRESHOLD or b"\0" in sample or any(fnmatch(name, p) or fnmatch(path, p) for p in patterns)

    def do_PUT(self):
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})(?:/part/(\d+))?", path)
        if not m:
            return self._error(404, f"no route for PUT {path}")
        oid, part = m.groups()
        with self.state.lock:
            if part is not None:
                self.state.lfs_parts.setdefault(oid, {})[int(part)] = body
                return self._send(200, b"", headers={"ETag": f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'})
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "uploaded content does not match its sha256")
            self.state.lfs_objects[oid] = body
        return self._send(200, b"")

    def _lfs_batch(self, body: bytes):
        req = json.loads(body)
        if req.get("operation") != "upload" or req.get("hash_algo", "sha256") != "sha256":
            return self._error(400, "only sha256 uploads are supported")
        transfer = "multipart" if "multipart" in req.get("transfers", []) else "basic"
        out = []
        for obj in req["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in self.state.lfs_objects:
                out.append({"oid": oid, "size": size})  # already stored: no actions, nothing to upload
                continue
            verify = {"href": f"{self.endpoint}/lfs-verify", "header": {}}
            chunk = self.state.multipart_chunk
            if transfer == "multipart" and size > chunk:
                n = -(-size // chunk)
                header = {"chunk_size": str(chunk), **{str(i): f"{self.endpoint}/lfs-upload/{oid}/part/{i}"
                                                       for i in range(1, n + 1)}}
                upload = {"href": f"{self.endpoint}/lfs-complete/{oid}", "header": header}
            else:
                upload = {"href": f"{self.endpoint}/lfs-upload/{oid}"}
            out.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
        return self._send(200, {"transfer": transfer, "objects": out, "hash_algo": "sha256"},
                          headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_complete(self, oid: str, body: bytes):
        parts = self.state.lfs_parts.pop(oid, {})
        listed = [p["partNumber"] for p in json.loads(body).get("parts", [])]
        if not parts or listed != sorted(parts):
            return self._error(400, f"multipart completion for {oid[:12]}: parts {listed} != uploaded {sorted(parts)}")
        data = b"".join(parts[i] for i in sorted(parts))
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "assembled parts do not match their sha256")
        self.state.lfs_objects[oid] = data
        return self._send(200, {})
