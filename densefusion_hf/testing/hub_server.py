"""A local stand-in for the Hugging Face Hub's HTTP API.

Tests, benchmarks and offline demos of ``df-hf publish`` point the real clients (``huggingface_hub``'s
``HfApi``, ``hf_hub_download`` and ``HfFileSystem``, and ``datasets.load_dataset``) at this server by
setting, before those libraries are imported::

    HF_ENDPOINT=http://127.0.0.1:PORT   HF_HUB_DISABLE_XET=1   HF_TOKEN=<anything>

It speaks the parts of the Hub's API those clients use: repository creation and deletion, repo info,
pre-upload, the Git LFS "basic" transfer (batch, PUT, verify), NDJSON commits (optionally opening a pull
request), tree listings and paths-info (paginated like the Hub), ``resolve`` downloads with HTTP ranges,
branches, tags, refs and commit history.  Anything else answers 404 with a JSON error and is recorded in
the request log as ``unhandled``, so a client that needs a missing endpoint is visible.

State lives on disk under ``root``: file contents in ``blobs/`` (content-addressed by sha256, shared by all
repositories) and one JSON document per repository in ``repos/`` (every commit as a full path -> file
snapshot, plus the branch, tag and pull-request refs), rewritten atomically.  A server restarted on the
same root serves the same repositories.

Any ``Authorization: Bearer`` token is accepted; requests that write need one (401 otherwise).  Given
``tokens`` (token -> the namespaces it may write; ``--token TOKEN=NS,NS``), the server answers like the Hub
to any other token (401 "Invalid credentials") and to a write outside those namespaces (403).  Tokens are
never logged.  Test hooks live under ``/_fake/`` (request log and counters, simulated commit and download
failures); the log also lists every file download with the ``Range`` it asked for; ``FakeHub.download_rate``
slows downloads down, ``FakeHub.drop_download_after`` cuts the next one's connection after N bytes and
``FakeHub.fail_downloads`` answers every download of matching files with an HTTP error or a hang-up.

Run it by hand with ``python -m densefusion_hf.testing.hub_server --root DIR [--port N]``.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

USER = "tester"
USER_ORGS = ("tester-org",)
DEFAULT_BRANCH = "main"
REGULAR_FILE_MAX_SIZE = 10 * 1024 * 1024  # above this the Hub asks for LFS whatever the file type
LFS_EXTENSIONS = (
    ".7z", ".arrow", ".avro", ".bin", ".bz2", ".ckpt", ".gif", ".gz", ".h5", ".jpeg", ".jpg", ".lz4",
    ".mp3", ".mp4", ".npy", ".npz", ".onnx", ".parquet", ".pb", ".pickle", ".pkl", ".png", ".pt", ".pth",
    ".safetensors", ".tar", ".tgz", ".tiff", ".wav", ".webp", ".xz", ".zip", ".zst",
)
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS)
URL_PREFIXES = {"dataset": "datasets/", "space": "spaces/", "model": ""}
KINDS = {"datasets": "dataset", "spaces": "space", "models": "model"}
CHUNK = 1024 * 1024

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REPO = rf"/api/(?P<kind>datasets|models|spaces)/{_REPO}"
_WEB_REPO = rf"/(?:(?P<kind>datasets|spaces)/)?{_REPO}"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("GET", _API_REPO, "repo_info"),
    ("GET", _API_REPO + r"/revision/(?P<rest>.+)", "repo_info"),
    ("POST", _API_REPO + r"/preupload/(?P<rest>.+)", "preupload"),
    ("POST", _API_REPO + r"/commit/(?P<rest>.+)", "commit"),
    ("GET", _API_REPO + r"/tree/(?P<rest>.+)", "tree"),
    ("POST", _API_REPO + r"/paths-info/(?P<rest>.+)", "paths_info"),
    ("GET", _API_REPO + r"/refs", "refs"),
    ("GET", _API_REPO + r"/commits/(?P<rest>.+)", "commits"),
    ("POST", _API_REPO + r"/branch/(?P<rest>.+)", "create_branch"),
    ("DELETE", _API_REPO + r"/branch/(?P<rest>.+)", "delete_branch"),
    ("POST", _API_REPO + r"/tag/(?P<rest>.+)", "create_tag"),
    ("DELETE", _API_REPO + r"/tag/(?P<rest>.+)", "delete_tag"),
    ("GET", _WEB_REPO + r"/resolve/(?P<rest>.+)", "resolve"),
    ("HEAD", _WEB_REPO + r"/resolve/(?P<rest>.+)", "resolve"),
    ("POST", _WEB_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("POST", r"/_lfs/verify", "lfs_verify"),
    ("GET", r"/_fake/log", "fake_log"),
    ("POST", r"/_fake/reset-log", "fake_reset_log"),
    ("POST", r"/_fake/fail-commits", "fake_fail_commits"),
    ("POST", r"/_fake/fail-downloads", "fake_fail_downloads"),
]
COMPILED_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class HubError(Exception):
    """An error answered to the client, with the ``X-Error-Code`` the real Hub would send."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Hangup(ConnectionError):
    """Raised by a handler to close the connection without any answer, as a reset link does."""


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str) -> HubError:
    return HubError(404, f"Entry not found: {path}", "EntryNotFound")


# ---------------------------------------------------------------------------------------------------
# Hashes and file entries (how the Hub names contents)
# ---------------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports for regular files (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def pointer_size(entry: dict) -> int:
    return len(lfs_pointer(entry["sha256"], entry["size"]))


def regular_entry(sha256: str, data: bytes) -> dict:
    return {"sha256": sha256, "size": len(data), "lfs": False, "oid": git_blob_oid(data)}


def lfs_entry(sha256: str, size: int) -> dict:
    # In git an LFS file is its pointer, so its object id is the pointer's blob id.
    return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """"lfs" for binary, big or typically-binary files (what the Hub's .gitattributes routes to LFS)."""
    if size > REGULAR_FILE_MAX_SIZE or b"\0" in sample or path.lower().endswith(LFS_EXTENSIONS):
        return "lfs"
    return "regular"


def client_oid(entry: dict) -> str:
    """The id ``huggingface_hub`` compares with its local file to skip unchanged files (sha256 for LFS)."""
    return entry["sha256"] if entry["lfs"] else entry["oid"]


def check_repo_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repository: {path!r}")
    return path


# ---------------------------------------------------------------------------------------------------
# Storage: content-addressed blobs and one JSON document per repository
# ---------------------------------------------------------------------------------------------------


class BlobStore:
    """File contents keyed by sha256, written through a temporary file and renamed into place."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            self._commit_file(self._write_tmp([data])[0], sha256)
        return sha256

    def put_stream(self, chunks, expected_sha256: str, expected_size: int) -> None:
        """Store streamed bytes, refusing them (HubError 400) unless their sha256 and size are the expected ones."""
        tmp_path, sha256, size = self._write_tmp(chunks)
        if (sha256, size) != (expected_sha256, expected_size):
            tmp_path.unlink()
            raise HubError(400, f"Uploaded content has sha256 {sha256} and size {size}, "
                                f"expected {expected_sha256} and {expected_size}")
        self._commit_file(tmp_path, sha256)

    def _write_tmp(self, chunks) -> tuple[Path, str, int]:
        digest, size = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except BaseException:  # the client went away mid-body: keep no partial object
            os.unlink(name)
            raise
        return Path(name), digest.hexdigest(), size

    def _commit_file(self, tmp_path: Path, sha256: str) -> None:
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp_path, target)


class RepoStore:
    """Repository documents under ``repos/<kind>s/<namespace>/<name>.json``."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, kind: str, repo_id: str) -> Path:
        return self.root / f"{kind}s" / f"{repo_id}.json"

    def load(self, kind: str, repo_id: str) -> dict | None:
        path = self._path(kind, repo_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, repo: dict) -> None:
        path = self._path(repo["kind"], repo["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(repo))
        os.replace(tmp, path)  # readers never see a half-written document

    def delete(self, kind: str, repo_id: str) -> bool:
        path = self._path(kind, repo_id)
        if not path.is_file():
            return False
        path.unlink()
        return True


# ---------------------------------------------------------------------------------------------------
# Repository model: commits, refs and trees (pure functions on the JSON document)
# ---------------------------------------------------------------------------------------------------


def new_repo(kind: str, repo_id: str, private: bool, blobs: BlobStore) -> dict:
    repo = {"kind": kind, "id": repo_id, "private": private, "createdAt": now_iso(),
            "commits": {}, "branches": {}, "tags": {}, "pulls": {}}
    data = GITATTRIBUTES.encode()
    files = {".gitattributes": regular_entry(blobs.put_bytes(data), data)}
    repo["branches"][DEFAULT_BRANCH] = add_commit(repo, None, files, "initial commit", "", "system")
    return repo


def add_commit(repo: dict, parent: str | None, files: dict, title: str, message: str, author: str) -> str:
    commit = {"parents": [parent] if parent else [], "files": files, "title": title, "message": message,
              "authors": [author], "date": now_iso()}
    commit_id = hashlib.sha1(json.dumps(commit, sort_keys=True).encode() + uuid.uuid4().bytes).hexdigest()
    repo["commits"][commit_id] = {"id": commit_id, **commit}
    return commit_id


def resolve_revision(repo: dict, revision: str) -> str:
    """The commit id a branch, tag, ``refs/...`` name or commit id points to (RevisionNotFound otherwise)."""
    for prefix, refs in (("", repo["branches"]), ("refs/heads/", repo["branches"]),
                         ("", repo["tags"]), ("refs/tags/", repo["tags"]), ("refs/pr/", repo["pulls"])):
        if revision.startswith(prefix) and revision[len(prefix):] in refs:
            return refs[revision[len(prefix):]]
    if revision in repo["commits"]:
        return revision
    raise revision_not_found(revision)


def writable_ref(repo: dict, revision: str) -> tuple[dict, str]:
    """The (refs table, name) a commit to ``revision`` moves: a branch or a pull request, nothing else."""
    name = revision.removeprefix("refs/heads/")
    if name in repo["branches"]:
        return repo["branches"], name
    match = re.fullmatch(r"refs/pr/(\d+)", revision)
    if match and match.group(1) in repo["pulls"]:
        return repo["pulls"], match.group(1)
    if revision in repo["tags"] or revision in repo["commits"]:
        raise HubError(400, f"Cannot commit to {revision!r}: only branches and pull requests (refs/pr/N) move")
    raise revision_not_found(revision)


def open_pull_request(repo: dict, base_commit: str) -> tuple[dict, str]:
    number = str(max(map(int, repo["pulls"]), default=0) + 1)
    repo["pulls"][number] = base_commit
    return repo["pulls"], number


def first_parent_chain(repo: dict, commit_id: str):
    while commit_id:
        commit = repo["commits"][commit_id]
        yield commit
        commit_id = commit["parents"][0] if commit["parents"] else None


def folder_oid(files: dict, folder: str) -> str | None:
    prefix = folder + "/"
    inside = sorted(f"{path} {entry['oid']}" for path, entry in files.items() if path.startswith(prefix))
    return hashlib.sha1("\n".join(inside).encode()).hexdigest() if inside else None


def path_oid(files: dict, path: str) -> str | None:
    return files[path]["oid"] if path in files else folder_oid(files, path)


def last_commit(repo: dict, commit_id: str, path: str) -> dict:
    """The oldest commit, going back from ``commit_id``, since which ``path`` has been as it is now."""
    chain = first_parent_chain(repo, commit_id)
    found = next(chain)
    oid = path_oid(found["files"], path)
    for older in chain:
        if path_oid(older["files"], path) != oid:
            break
        found = older
    return {"id": found["id"], "title": found["title"], "date": found["date"]}


def folders_of(paths) -> set[str]:
    return {path.rsplit("/", i)[0] for path in paths for i in range(1, path.count("/") + 1)}


def tree_paths(files: dict, folder: str, recursive: bool) -> list[str]:
    """Paths listed by ``tree/<rev>/<folder>``: files and folders below it, direct children only unless recursive."""
    if folder in files:
        return [folder]  # the Hub lists a file as itself
    prefix = folder + "/" if folder else ""
    below = [path for path in files if path.startswith(prefix)]
    if folder and not below:
        raise entry_not_found(folder)
    listed = set(below) | {f for f in folders_of(below) if f.startswith(prefix)}
    if not recursive:
        listed = {path for path in listed if "/" not in path[len(prefix):]}
    return sorted(listed)


def path_info(repo: dict, commit_id: str, path: str, expand: bool) -> dict:
    """One entry of a tree listing or of paths-info, shaped like the Hub's."""
    files = repo["commits"][commit_id]["files"]
    if path in files:
        entry = files[path]
        info = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size(entry)}
    else:
        info = {"type": "directory", "oid": folder_oid(files, path), "size": 0, "path": path}
    if expand:
        info["lastCommit"] = last_commit(repo, commit_id, path)
    return info


def apply_operations(files: dict, operations: list[dict], blobs: BlobStore) -> dict:
    """The snapshot after a commit's NDJSON operations ("file", "lfsFile", "deletedFile", "deletedFolder")."""
    files = dict(files)
    for operation in operations:
        key, value = operation.get("key"), operation.get("value") or {}
        path = check_repo_path(str(value.get("path", "")).rstrip("/"))
        if key == "file":
            data = base64.b64decode(value.get("content", ""))
            files[path] = regular_entry(blobs.put_bytes(data), data)
        elif key == "lfsFile":
            files[path] = committed_lfs_entry(path, value, blobs)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")
    return files


def committed_lfs_entry(path: str, value: dict, blobs: BlobStore) -> dict:
    sha256, size = value.get("oid", ""), value.get("size")
    if value.get("algo", "sha256") != "sha256" or not blobs.has(sha256):
        raise HubError(400, f"lfsFile {path}: LFS object {sha256} was never uploaded "
                            "(upload it through the LFS batch API before committing)")
    actual_size = blobs.path(sha256).stat().st_size
    if size is not None and size != actual_size:
        raise HubError(400, f"lfsFile {path}: size {size} does not match the uploaded object ({actual_size})")
    return lfs_entry(sha256, actual_size)


def card_data(readme: str) -> dict | None:
    """The YAML front matter of a README, as the Hub's ``cardData``.

    None when the README has none (or PyYAML, the only non-stdlib module used, is missing); ValueError
    when it is not a YAML mapping.
    """
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", readme, re.S | re.M)
    if not match:
        return None
    try:
        import yaml
    except ImportError:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ValueError(f"README.md metadata is not valid YAML: {error}") from None
    if not isinstance(data, (dict, type(None))):
        raise ValueError("README.md metadata must be a YAML mapping")
    return data or {}


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list | None = None
    headers: dict = field(default_factory=dict)
    blob: Path | None = None  # a file to stream (resolve), from ``offset`` for ``length`` bytes
    offset: int = 0
    length: int = 0


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: object
    params: dict
    body: bytes = b""

    @property
    def kind(self) -> str:
        return KINDS.get(self.params.get("kind") or "models")

    @property
    def repo_id(self) -> str:
        return unquote(self.params["repo"])

    @property
    def token(self) -> str | None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def arg(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, [default])[0]

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true")

    def json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON")

    def revision_and_path(self) -> tuple[str, str]:
        """Split ``rest`` into a revision (one URL-quoted segment, or an unquoted refs/pr/N) and a path."""
        segments = self.params["rest"].split("/")
        take = 3 if segments[0] == "refs" and len(segments) >= 3 and segments[1] in ("pr", "convert") else 1
        revision = unquote("/".join(segments[:take]))
        return revision, "/".join(unquote(s) for s in segments[take:])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "FakeHub"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client killed mid-request
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: streaming readers issue many range requests
    disable_nagle_algorithm = True  # headers and body go in two writes; Nagle would hold the body ~40 ms
    timeout = 300
    server: _Server

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_HEAD(self):  # noqa: N802
        self._handle("HEAD")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self):  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format, *args):  # quiet: the request log is at /_fake/log
        pass

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub.record_request(method, url.path)
        name, params = self._match(method, url.path)
        request = Request(method, url.path, parse_qs(url.query), self.headers, params)
        try:
            if name != "lfs_put":  # the upload streams its own body; every other body is read before replying
                request.body = b"".join(self._body_chunks())
            reply = self._dispatch(hub, name, request)
        except HubError as error:
            reply = error_reply(error)
        except (ConnectionError, TimeoutError):  # the client is gone (killed mid-request), or a Hangup
            self.close_connection = True
            return
        except Exception:
            logger.error("fake hub: %s %s failed\n%s", method, url.path, traceback.format_exc())
            reply = Reply(500, {"error": "Internal error in the fake hub (see its log)"})
        try:
            self._send(reply, head_only=method == "HEAD")
        except (ConnectionError, TimeoutError):  # the client went away before the answer
            self.close_connection = True

    def _match(self, method: str, path: str) -> tuple[str | None, dict]:
        for route_method, pattern, name in COMPILED_ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return name, match.groupdict()
        return None, {}

    def _dispatch(self, hub: "FakeHub", name: str | None, request: Request) -> Reply:
        if name is None:
            hub.record_unhandled(request.method, request.path)
            raise HubError(404, f"Not implemented by the fake hub: {request.method} {request.path}")
        if name == "lfs_put":
            return hub.api.lfs_put(request, self._body_chunks())
        return getattr(hub.api, name)(request)

    def _body_chunks(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            yield from self._chunked_body()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _chunked_body(self):
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()  # the CRLF closing the chunk

    def _send(self, reply: Reply, head_only: bool) -> None:
        body = reply.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            reply.headers.setdefault("Content-Type", "application/json")
        length = reply.length if reply.blob is not None else len(body or b"")
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head_only:
            return
        if reply.blob is not None:
            self._stream_blob(reply)
        elif body:
            self.wfile.write(body)

    def _stream_blob(self, reply: Reply) -> None:
        rate = self.server.hub.download_rate
        piece = CHUNK if rate is None else max(1, min(CHUNK, rate // 10))
        cut = self.server.hub.take_dropped_download()
        with open(reply.blob, "rb") as src:
            src.seek(reply.offset)
            remaining = reply.length if cut is None else min(cut, reply.length)
            if cut is not None:  # the connection is lost after ``cut`` bytes, as on a flaky link
                self.close_connection = True
            while remaining > 0:
                chunk = src.read(min(piece, remaining))
                self.wfile.write(chunk)
                remaining -= len(chunk)
                if rate is not None:  # a slow link, so a test can interrupt a download half-way
                    self.wfile.flush()
                    time.sleep(len(chunk) / rate)


def error_reply(error: HubError) -> Reply:
    headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode()}
    if error.code:
        headers["X-Error-Code"] = error.code
    return Reply(error.status, {"error": error.message}, headers)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, length) for a single ``bytes=`` range; None for the whole file; HubError 416 if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes ("bytes=-0" starts past the end, so it is refused)
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
    if start >= size or end < start:
        raise HubError(416, f"Range {header} not satisfiable for a file of {size} bytes")
    return start, end - start + 1


class HubApi:
    """The endpoint handlers: each takes a parsed Request and returns a Reply (or raises HubError)."""

    def __init__(self, hub: "FakeHub"):
        self.hub = hub
        self.blobs, self.repos = hub.blobs, hub.repos

    # -- helpers ------------------------------------------------------------------------------------

    def _base_url(self, request: Request) -> str:
        return f"http://{request.headers.get('Host') or self.hub.url.split('://', 1)[1]}"

    def _repo_url(self, request: Request, kind: str, repo_id: str) -> str:
        return f"{self._base_url(request)}/{URL_PREFIXES[kind]}{repo_id}"

    def _require_token(self, request: Request, repo_id: str | None = None) -> None:
        """A write needs a token; with ``tokens`` set, a known one allowed to write ``repo_id``'s namespace
        (by default the repo the URL names)."""
        if request.token is None:
            raise HubError(401, "Authentication required: send an Authorization: Bearer <token> header to write")
        self._check_token(request)
        repo_id = repo_id or (request.repo_id if "repo" in request.params else None)
        allowed = self.hub.tokens[request.token] if self.hub.tokens is not None else None
        if repo_id and allowed is not None and repo_id.split("/")[0] not in allowed:
            raise HubError(403, f"You don't have the rights to write to {repo_id}: this token may write to "
                                f"{', '.join(allowed) or 'no namespace'}", "Forbidden")

    def _check_token(self, request: Request) -> None:
        """Like the Hub, a token it does not know is refused whatever the request."""
        if request.token is not None and self.hub.tokens is not None and request.token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header", "InvalidCredentials")

    def _repo(self, request: Request) -> dict:
        self._check_token(request)
        repo_id = request.repo_id
        repo = self.repos.load(request.kind, repo_id)
        if repo is None:
            raise repo_not_found(repo_id)
        if repo["private"] and request.token is None:
            raise HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")  # as the Hub hides it
        return repo

    def _paginate(self, request: Request, items: list, render=lambda item: item) -> Reply:
        """One page of ``items`` (rendered), with a Link header to the next page like the Hub's cursors."""
        start = int(request.arg("cursor", "0"))
        end = start + self.hub.page_size
        headers = {}
        if end < len(items):
            query = {k: v[0] for k, v in request.query.items()} | {"cursor": str(end)}
            next_url = f"{self._base_url(request)}{request.path}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return Reply(200, [render(item) for item in items[start:end]], headers)

    # -- account and repositories -------------------------------------------------------------------

    def whoami(self, request: Request) -> Reply:
        self._require_token(request)
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in USER_ORGS]
        return Reply(200, {"type": "user", "id": "fake-user-id", "name": USER, "fullname": "Fake Hub Tester",
                           "email": f"{USER}@example.test", "emailVerified": True, "orgs": orgs,
                           "auth": {"type": "access_token",
                                    "accessToken": {"displayName": "fake-hub", "role": "write"}}})

    def agent_harnesses(self, request: Request) -> Reply:
        # huggingface_hub fetches this registry to tag its user agent (unless telemetry is off); empty = no agent.
        return Reply(200, {"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self, request: Request) -> Reply:
        try:
            card_data(request.json().get("content", ""))
        except ValueError as error:
            return Reply(400, {"errors": [{"message": str(error)}], "warnings": []})
        return Reply(200, {"errors": [], "warnings": []})

    def _named_repo(self, request: Request) -> tuple[str, str]:
        payload = request.json()
        name, organization = payload.get("name") or "", payload.get("organization")
        repo_id = name if "/" in name else f"{organization or USER}/{name}"
        kind = payload.get("type") or "model"
        if kind not in URL_PREFIXES or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"Invalid repository: {kind} {repo_id!r}")
        return kind, repo_id

    def create_repo(self, request: Request) -> Reply:
        kind, repo_id = self._named_repo(request)
        self._require_token(request, repo_id)
        payload = request.json()
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        url = self._repo_url(request, kind, repo_id)
        with self.hub.lock:
            if self.repos.load(kind, repo_id) is not None:
                return Reply(409, {"error": f"You already created this {kind} repo", "url": url})
            self.repos.save(new_repo(kind, repo_id, private, self.blobs))
        return Reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, request: Request) -> Reply:
        kind, repo_id = self._named_repo(request)
        self._require_token(request, repo_id)
        with self.hub.lock:
            if not self.repos.delete(kind, repo_id):
                raise repo_not_found(repo_id)
        return Reply(200, {})

    def repo_info(self, request: Request) -> Reply:
        repo = self._repo(request)
        revision = unquote(request.params.get("rest") or DEFAULT_BRANCH)
        commit = repo["commits"][resolve_revision(repo, revision)]
        return Reply(200, self._info_document(repo, commit))

    def _info_document(self, repo: dict, commit: dict) -> dict:
        files = commit["files"]
        siblings = [self._sibling(path, files[path]) for path in sorted(files)]
        info = {"_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24], "id": repo["id"],
                "author": repo["id"].split("/")[0], "sha": commit["id"], "private": repo["private"],
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "createdAt": repo["createdAt"], "lastModified": commit["date"], "siblings": siblings,
                "usedStorage": sum(entry["size"] for entry in files.values())}
        if repo["kind"] == "model":
            info["modelId"] = repo["id"]
        card = self._card(files)
        if card is not None:
            info["cardData"] = card
        return info

    def _card(self, files: dict) -> dict | None:
        if "README.md" not in files:
            return None
        try:
            return card_data(self.blobs.path(files["README.md"]["sha256"]).read_text(errors="replace"))
        except ValueError:
            return None

    @staticmethod
    def _sibling(path: str, entry: dict) -> dict:
        sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": pointer_size(entry)}
        return sibling

    # -- uploads and commits ------------------------------------------------------------------------

    def preupload(self, request: Request) -> Reply:
        self._require_token(request)
        repo = self._repo(request)
        revision, _ = request.revision_and_path()
        files = repo["commits"][resolve_revision(repo, revision)]["files"]
        answers = []
        for item in request.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            answer = {"path": path, "shouldIgnore": False,
                      "uploadMode": upload_mode(path, size, base64.b64decode(item.get("sample", "")))}
            if path in files:
                answer["oid"] = client_oid(files[path])
            answers.append(answer)
        return Reply(200, {"files": answers})

    def lfs_batch(self, request: Request) -> Reply:
        self._require_token(request)
        self._repo(request)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise HubError(501, "The fake hub's LFS batch API only supports the upload operation")
        objects = [self._lfs_object(request, obj["oid"], int(obj["size"])) for obj in payload.get("objects", [])]
        # Only the basic transfer: no multipart chunking, no xet, whatever the client offers.
        return Reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_object(self, request: Request, oid: str, size: int) -> dict:
        obj = {"oid": oid, "size": size, "authenticated": True}
        if not self.blobs.has(oid, size):  # no "actions" tells the client the object is already stored
            base = self._base_url(request)
            upload = f"{base}/_lfs/objects/{oid}?{urlencode({'size': size, 'sig': self.hub.sign(oid, size)})}"
            obj["actions"] = {"upload": {"href": upload}, "verify": {"href": f"{base}/_lfs/verify"}}
        return obj

    def lfs_put(self, request: Request, chunks) -> Reply:
        # Like a presigned storage URL: the client sends no token here, the signature stands for it.
        oid, size = request.params["oid"], int(request.arg("size", "-1"))
        if not hmac.compare_digest(request.arg("sig", ""), self.hub.sign(oid, size)):
            for _ in chunks:  # drain the body so the kept-alive connection stays usable
                pass
            raise HubError(403, "Invalid or missing upload signature")
        self.blobs.put_stream(chunks, oid, size)
        self.hub.count_lfs_upload(oid, size)
        return Reply(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, request: Request) -> Reply:
        self._require_token(request)
        payload = request.json()
        if not self.blobs.has(payload.get("oid", ""), payload.get("size")):
            raise HubError(404, f"LFS object {payload.get('oid')} of size {payload.get('size')} is not stored")
        return Reply(200, {"oid": payload["oid"], "size": payload["size"]})

    def commit(self, request: Request) -> Reply:
        self._require_token(request)
        header, operations = parse_commit_payload(request.body)
        revision, _ = request.revision_and_path()
        with self.hub.lock:
            repo = self._repo(request)
            self.hub.take_commit_permit()
            if request.flag("create_pr"):
                refs, name = open_pull_request(repo, resolve_revision(repo, revision))
            else:
                refs, name = writable_ref(repo, revision)
            parent = refs[name]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, f"A commit has happened since {header['parentCommit']}: "
                                    f"{revision} is now at {parent}. Please refresh and try again.")
            files = apply_operations(repo["commits"][parent]["files"], operations, self.blobs)
            title = header.get("summary") or "Commit"
            refs[name] = add_commit(repo, parent, files, title, header.get("description") or "", USER)
            self.repos.save(repo)
            self.hub.count_commit()
        repo_url = self._repo_url(request, repo["kind"], repo["id"])
        return Reply(200, {"success": True, "commitOid": refs[name], "commitUrl": f"{repo_url}/commit/{refs[name]}",
                           "commitMessage": title, "pullRequestUrl":
                           f"{repo_url}/discussions/{name}" if request.flag("create_pr") else None})

    # -- listing ------------------------------------------------------------------------------------

    def tree(self, request: Request) -> Reply:
        repo = self._repo(request)
        revision, folder = request.revision_and_path()
        commit_id = resolve_revision(repo, revision)
        paths = tree_paths(repo["commits"][commit_id]["files"], folder.strip("/"), request.flag("recursive"))
        expand = request.flag("expand")
        return self._paginate(request, paths, lambda path: path_info(repo, commit_id, path, expand))

    def paths_info(self, request: Request) -> Reply:
        repo = self._repo(request)
        revision, _ = request.revision_and_path()
        commit_id = resolve_revision(repo, revision)
        files = repo["commits"][commit_id]["files"]
        form = parse_qs(request.body.decode())
        expand = (form.get("expand", ["false"])[0]).lower() == "true"
        wanted = [p.strip("/") for p in form.get("paths", [])]
        found = [p for p in wanted if p and path_oid(files, p) is not None]
        return Reply(200, [path_info(repo, commit_id, path, expand) for path in found])

    def commits(self, request: Request) -> Reply:
        repo = self._repo(request)
        revision, _ = request.revision_and_path()
        history = [{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                    "authors": [{"user": author} for author in c["authors"]]}
                   for c in first_parent_chain(repo, resolve_revision(repo, revision))]
        return self._paginate(request, history)

    def refs(self, request: Request) -> Reply:
        repo = self._repo(request)

        def listing(refs: dict, ref_prefix: str, name_prefix: str = "") -> list[dict]:
            return [{"name": name_prefix + name, "ref": ref_prefix + name, "targetCommit": sha}
                    for name, sha in sorted(refs.items())]

        return Reply(200, {"branches": listing(repo["branches"], "refs/heads/"),
                           "tags": listing(repo["tags"], "refs/tags/"), "converts": [],
                           "pullRequests": listing(repo["pulls"], "refs/pr/", name_prefix="refs/pr/")})

    # -- branches and tags --------------------------------------------------------------------------

    def create_branch(self, request: Request) -> Reply:
        self._require_token(request)
        branch, _ = request.revision_and_path()
        with self.hub.lock:
            repo = self._repo(request)
            if branch in repo["branches"]:
                raise HubError(409, f"Branch {branch} already exists")
            start = request.json().get("startingPoint") or DEFAULT_BRANCH
            repo["branches"][branch] = resolve_revision(repo, start)
            self.repos.save(repo)
        return Reply(200, {})

    def delete_branch(self, request: Request) -> Reply:
        self._require_token(request)
        branch, _ = request.revision_and_path()
        with self.hub.lock:
            repo = self._repo(request)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, f"Cannot delete the default branch {branch}")
            if repo["branches"].pop(branch, None) is None:
                raise revision_not_found(branch)
            self.repos.save(repo)
        return Reply(200, {})

    def create_tag(self, request: Request) -> Reply:
        self._require_token(request)
        revision, _ = request.revision_and_path()
        tag = request.json().get("tag") or ""
        with self.hub.lock:
            repo = self._repo(request)
            if tag in repo["tags"]:
                raise HubError(409, f"Tag {tag} already exists")
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", tag):
                raise HubError(400, f"Invalid tag name: {tag!r}")
            repo["tags"][tag] = resolve_revision(repo, revision)
            self.repos.save(repo)
        return Reply(200, {})

    def delete_tag(self, request: Request) -> Reply:
        self._require_token(request)
        tag, _ = request.revision_and_path()
        with self.hub.lock:
            repo = self._repo(request)
            if repo["tags"].pop(tag, None) is None:
                raise revision_not_found(tag)
            self.repos.save(repo)
        return Reply(200, {})

    # -- downloads ----------------------------------------------------------------------------------

    def resolve(self, request: Request) -> Reply:
        repo = self._repo(request)
        revision, path = request.revision_and_path()
        commit_id = resolve_revision(repo, revision)
        entry = repo["commits"][commit_id]["files"].get(path)
        self.hub.take_download_permit(path)
        if entry is None:
            error = error_reply(entry_not_found(path))
            error.headers["X-Repo-Commit"] = commit_id  # lets hf_hub_download cache the absence
            return error
        headers = {"X-Repo-Commit": commit_id, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{client_oid(entry)}"'}
        if entry["lfs"]:
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])}
        try:
            byte_range = parse_range(request.headers.get("Range"), entry["size"])
        except HubError as error:
            reply = error_reply(error)
            reply.headers["Content-Range"] = f"bytes */{entry['size']}"
            return reply
        if request.method == "GET":
            self.hub.record_range(path, request.headers.get("Range"))
        reply = Reply(200, headers=headers, blob=self.blobs.path(entry["sha256"]), length=entry["size"])
        if byte_range is not None:
            reply.status, (reply.offset, reply.length) = 206, byte_range
            last = reply.offset + reply.length - 1
            headers["Content-Range"] = f"bytes {reply.offset}-{last}/{entry['size']}"
        return reply

    # -- test hooks ---------------------------------------------------------------------------------

    def fake_log(self, request: Request) -> Reply:
        return Reply(200, self.hub.request_log())

    def fake_reset_log(self, request: Request) -> Reply:
        self.hub.reset_log()
        return Reply(200, {})

    def fake_fail_commits(self, request: Request) -> Reply:
        after = request.json().get("after")
        self.hub.fail_commits(after=None if after is None else int(after))
        return Reply(200, {"after": after})

    def fake_fail_downloads(self, request: Request) -> Reply:
        body = request.json()
        answer = body.get("answer")
        self.hub.fail_downloads(answer if answer in (None, "hangup") else int(answer), body.get("paths", "*"))
        return Reply(200, {"answer": answer})


def parse_commit_payload(body: bytes) -> tuple[dict, list[dict]]:
    """The header value and the operations of an NDJSON commit body."""
    try:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except ValueError:
        raise HubError(400, "Commit payload is not valid NDJSON")
    headers = [line.get("value") or {} for line in lines if line.get("key") == "header"]
    if len(headers) != 1:
        raise HubError(400, "Commit payload needs exactly one header line")
    return headers[0], [line for line in lines if line.get("key") != "header"]


# ---------------------------------------------------------------------------------------------------
# The server object
# ---------------------------------------------------------------------------------------------------


class FakeHub:
    """A fake Hub serving ``root`` on 127.0.0.1 from a daemon thread; use ``start()``/``stop()`` or ``with``.

    ``page_size`` is the number of entries per page of tree and commit listings (the real Hub pages by
    1000, or 50 when ``expand=True``); small pages make clients really follow the pagination.
    """

    def __init__(self, root: str | os.PathLike, *, port: int = 0, page_size: int = 50,
                 tokens: dict[str, tuple[str, ...]] | None = None):
        self.root = Path(root).resolve()
        self.tokens = tokens  # None: any token writes anywhere
        self.blobs = BlobStore(self.root / "blobs")
        self.repos = RepoStore(self.root / "repos")
        self.page_size = page_size
        self.lock = threading.RLock()  # serialises repository changes and the counters
        self._secret = secrets.token_bytes(32)  # signs LFS upload URLs
        self._fail_after: int | None = None
        self._failed_downloads: tuple[int | str, str] | None = None
        self.download_rate: int | None = None  # bytes per second of file downloads; None: as fast as possible
        self.drop_download_after: int | None = None  # the next file download loses its connection after N bytes
        self.api = HubApi(self)
        self.reset_log()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() would wait forever for a loop that never ran
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def sign(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    # -- request log and counters (also served at /_fake/log) -------------------------------------------

    def reset_log(self) -> None:
        with self.lock:
            self._log = {"lfs_uploads": 0, "lfs_bytes": 0, "lfs_uploads_by_oid": {}, "commits": 0, "requests": [],
                         "unhandled": [], "downloads": []}

    def request_log(self) -> dict:
        """Counters and requests ("METHOD /path", no query) since start or the last reset."""
        with self.lock:
            return json.loads(json.dumps(self._log))

    def record_request(self, method: str, path: str) -> None:
        with self.lock:
            self._log["requests"].append(f"{method} {path}")

    def take_dropped_download(self) -> int | None:
        """Bytes after which this download's connection is to be lost (once, then reset), or None."""
        with self.lock:
            cut, self.drop_download_after = self.drop_download_after, None
            return cut

    def record_range(self, path: str, header: str | None) -> None:
        """A file download and the Range header it asked with (None: the whole file), so a resume shows."""
        with self.lock:
            self._log["downloads"].append({"path": path, "range": header})

    def record_unhandled(self, method: str, path: str) -> None:
        logger.warning("fake hub: no handler for %s %s", method, path)
        with self.lock:
            self._log["unhandled"].append(f"{method} {path}")

    def count_lfs_upload(self, oid: str, size: int) -> None:
        """One LFS object stored whole (an upload cut off mid-body stores nothing and counts nothing)."""
        with self.lock:
            self._log["lfs_uploads"] += 1
            self._log["lfs_bytes"] += size
            self._log["lfs_uploads_by_oid"][oid] = self._log["lfs_uploads_by_oid"].get(oid, 0) + 1

    def count_commit(self) -> None:
        with self.lock:
            self._log["commits"] += 1
            if self._fail_after is not None:
                self._fail_after -= 1

    # -- simulated failures -------------------------------------------------------------------------

    def fail_commits(self, after: int | None) -> None:
        """Answer 500 to every commit once ``after`` more have succeeded (None: stop failing)."""
        with self.lock:
            self._fail_after = after

    def fail_downloads(self, answer: int | str | None, paths: str = "*") -> None:
        """Answer every download (GET or HEAD of ``resolve``) of a file matching the glob ``paths`` with the
        HTTP status ``answer``, or close its connection unanswered (``"hangup"``); None: stop failing."""
        with self.lock:
            self._failed_downloads = None if answer is None else (answer, paths)

    def take_download_permit(self, path: str) -> None:
        with self.lock:
            failing = self._failed_downloads
        if failing is None or not fnmatch.fnmatch(path, failing[1]):
            return
        if failing[0] == "hangup":
            raise Hangup(f"simulated hang-up on {path}")
        raise HubError(failing[0], f"Simulated failure: the fake hub was told to fail downloads of {failing[1]} "
                                   f"(/_fake/fail-downloads)")

    def take_commit_permit(self) -> None:
        if self._fail_after is not None and self._fail_after <= 0:
            raise HubError(500, "Simulated failure: the fake hub was told to fail commits (/_fake/fail-commits)")


# Variables that would keep a client from talking to any Hub, this one included.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def client_env(url: str, scratch: Path, token: str) -> dict[str, str]:
    """The environment of a client process (huggingface_hub, datasets) talking to the fake at ``url``, with
    its caches under ``scratch``.  The clients read these when imported, so they go to a child process."""
    env = {name: value for name, value in os.environ.items() if name not in _OFFLINE_VARS}
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",  # the fake speaks the LFS protocol only
        HF_TOKEN=token,
        HF_HOME=str(Path(scratch) / "hf-home"),
        HF_DATASETS_CACHE=str(Path(scratch) / "hf-datasets-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY=no_proxy,  # a proxy set for other traffic (see tests.conftest) must not capture the fake
        no_proxy=no_proxy,
    )
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding the fake hub's blobs and repositories")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--token", action="append", metavar="TOKEN=NS,NS",
                        help="accept only these tokens, each writing only to the namespaces named (repeatable)")
    args = parser.parse_args(argv)
    tokens = None
    if args.token:
        tokens = {token: tuple(filter(None, spaces.split(","))) for token, _, spaces in
                  (entry.partition("=") for entry in args.token)}
    hub = FakeHub(args.root, port=args.port, tokens=tokens)
    print(f"Fake Hugging Face Hub serving {hub.root} at {hub.url}", flush=True)
    print(f"  export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_fake", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
