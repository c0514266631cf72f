"""A local stand-in for the Hugging Face Hub's file protocol, for tests that must not touch the network.

It speaks just enough of the Hub's HTTP API for the real ``huggingface_hub.snapshot_download`` /
``hf_hub_download`` (``huggingface_hub`` 2.x, pointed at it through ``endpoint=`` or the patched
``huggingface_hub.constants.ENDPOINT``) to download a model repo:

- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: model info with
  ``sha`` and ``siblings`` (``snapshot_download`` resolves the revision to a commit with it); with
  ``?blobs=true`` (``HfApi.model_info(files_metadata=True)``) siblings carry ``size``, ``blobId`` and, for
  LFS files, ``lfs.sha256`` as on the Hub;
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]``: the file listing (``oid``, ``size``, ``lfs``)
  that ``snapshot_download`` filters with ``allow_patterns``;
- ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{filename}``: the file, with ``X-Repo-Commit``, ``ETag``
  (git blob id, or sha256 for LFS-style weights, also as ``X-Linked-Etag`` / ``X-Linked-Size``),
  ``Content-Length`` and ``Range`` support (``huggingface_hub`` resumes a cut download with ``Range``).

Repos are registered from local folders (or a ``{path: bytes}`` mapping) with :meth:`HubServer.add_repo`;
each registered revision gets a deterministic 40-hex commit sha. :meth:`HubServer.fail` makes a repo
misbehave (404, 401, gated, 403, 5xx, a cut-short file, a stall), :meth:`HubServer.heal` makes it behave
again, and :attr:`HubServer.requests` records every request for assertions.

Typical use::

    with HubServer() as hub:
        sha = hub.add_repo("org/adapter", adapter_folder, extra_files={"pytorch_model.bin": b"x"})
        hub.fail("org/adapter", "error", status=500)   # every request for the repo answers 500
        hub.heal("org/adapter")
        hub.downloads("org/adapter")                   # filenames fetched with GET /resolve

Bind address is 127.0.0.1 on a free port; stalls are bounded (at most ``MAX_STALL_S``, or until
:meth:`HubServer.heal` for ``stall_s=None``) and are cut short when the server stops, so a test can never
hang on it. :meth:`HubServer.stalled` counts the requests a stall holds right now, so a test can wait for a
client to be stuck (a state) instead of sleeping.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and its timeouts into
``huggingface_hub.constants`` once, at import; :func:`use_hub_server` patches those constants (and the
environment, for anything that reads it later) for one test.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

#: Upper bound for a stall, whatever a test asks for.
MAX_STALL_S = 5.0

#: Files served LFS-style (sha256 ETag, ``lfs`` entry in the tree), as the Hub does for weights.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "*.h5", "*.msgpack")

#: Failure modes accepted by :meth:`HubServer.fail`.
MODES = ("not_found", "unauthorized", "gated", "forbidden", "error", "truncate", "short", "corrupt", "stall")
#: Modes that change a file's body rather than the answer (only a file GET has one).
BODY_MODES = ("truncate", "short", "corrupt")

#: Which requests a fault applies to (``on=`` of :meth:`HubServer.fail`).
TARGETS = ("all", "api", "info", "tree", "resolve", "head", "get")


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFileData:
    path: str
    data: bytes
    blob_id: str
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    sha: str
    files: dict[str, RepoFileData]


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)  # by sha
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if revision in self.commits:
            return self.commits[revision]
        return None


@dataclass
class Fault:
    """How a repo misbehaves; see :meth:`HubServer.fail`."""

    mode: str
    status: int
    on: str = "all"
    files: tuple[str, ...] = ()
    times: int | None = None
    stall_s: float | None = 3.0
    keep_bytes: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    hits: int = 0
    #: Set by :meth:`HubServer.heal`: requests this fault is stalling are let go.
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, kind: str, method: str, filename: str | None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        target_ok = {
            "all": True,
            "api": kind in ("info", "tree"),
            "info": kind == "info",
            "tree": kind == "tree",
            "resolve": kind == "resolve",
            "head": kind == "resolve" and method == "HEAD",
            "get": kind == "resolve" and method == "GET",
        }[self.on]
        if not target_ok:
            return False
        if self.files and (filename is None or not any(fnmatch.fnmatch(filename, p) for p in self.files)):
            return False
        # only a body can be cut short
        return self.mode not in BODY_MODES or (kind == "resolve" and method == "GET")


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received (``status`` is what it answered; 0 when it answered nothing)."""

    method: str
    path: str
    kind: str  # "info", "tree", "resolve" or "other"
    repo_id: str | None
    revision: str | None
    filename: str | None
    headers: Mapping[str, str]
    status: int
    fault: str | None


class HubServer:
    """A threaded HTTP server on 127.0.0.1 that serves registered repos like the Hub does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._stalled: dict[str, int] = {}
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def resolve_template(self) -> str:
        """Value for ``huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE`` pointing here."""
        return self.url + "/{repo_id}/resolve/{revision}/{filename}"

    def start(self) -> HubServer:
        """Start serving (on the previous port again after :meth:`stop`, when it is still free)."""
        if self._httpd is not None:
            return self
        handler = _make_handler(self)
        self._stopping.clear()
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        self._stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=MAX_STALL_S + 1)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- repos

    def add_repo(
        self,
        repo_id: str,
        source: Path | Mapping[str, bytes] | None = None,
        *,
        revision: str = "main",
        extra_files: Mapping[str, bytes] | None = None,
        sha: str | None = None,
    ) -> str:
        """Register (or add a revision to) ``repo_id`` and return the commit sha of ``revision``.

        ``source`` is a folder (every file under it, recursively) or a ``{path: bytes}`` mapping;
        ``extra_files`` are added on top (decoys such as a base model's ``pytorch_model.bin``). The sha is
        derived from the content and the revision name unless given; ``revision`` becomes a branch pointing
        to it (the commit is also reachable by its sha).
        """
        files: dict[str, bytes] = {}
        if isinstance(source, Path):
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    files[path.relative_to(source).as_posix()] = path.read_bytes()
        elif source is not None:
            files.update(source)
        files.update(extra_files or {})
        if sha is None:
            digest = hashlib.sha1(f"{repo_id}\0{revision}\0".encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
            sha = digest.hexdigest()
        entries = {
            name: RepoFileData(
                path=name,
                data=data,
                blob_id=git_blob_id(data),
                sha256=hashlib.sha256(data).hexdigest(),
                lfs=any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS),
            )
            for name, data in files.items()
        }
        with self._lock:
            repo = self._repos.setdefault(repo_id, Repo(repo_id))
            repo.commits[sha] = Commit(sha=sha, files=entries)
            repo.refs[revision] = sha
        return sha

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    # ----------------------------------------------------------------------------- faults

    def fail(
        self,
        repo_id: str,
        mode: str,
        *,
        status: int | None = None,
        on: str = "all",
        files: Iterable[str] = (),
        times: int | None = None,
        stall_s: float | None = 3.0,
        keep_bytes: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Make requests for ``repo_id`` misbehave (in addition to faults already set).

        Modes:
          - ``not_found``: 404, ``X-Error-Code: RepoNotFound`` (``RepositoryNotFoundError``);
          - ``unauthorized``: 401, ``X-Error-Code: RepoNotFound`` as the Hub answers for a private repo
            without a token (``RepositoryNotFoundError`` with status 401);
          - ``gated``: 403 (or ``status``), ``X-Error-Code: GatedRepo`` (``GatedRepoError``);
          - ``forbidden``: 403 without an error code (plain ``HfHubHTTPError``);
          - ``error``: 500 (or ``status``);
          - ``truncate``: a file GET announces the full ``Content-Length``, sends ``keep_bytes`` bytes
            (default: half) and closes the connection; a resumed (``Range``) GET then gets no body at all;
          - ``short``: a file GET is a complete HTTP response whose body (and ``Content-Length``) is
            shorter than the size the HEAD announced;
          - ``corrupt``: a file GET is complete and as announced (size, ``ETag``, ``X-Linked-Etag``, the
            listed ``lfs.sha256``) but its bytes are other ones (each byte inverted): a tampering proxy;
          - ``stall``: accept the request, answer nothing for ``stall_s`` seconds (bounded by
            ``MAX_STALL_S``), then close the connection; ``stall_s=None`` holds it until :meth:`heal` or
            :meth:`stop`, for a test whose client must still be waiting however slow the machine is.

        ``on`` limits the fault to some requests: ``all``, ``api`` (info + tree), ``info``, ``tree``,
        ``resolve`` (HEAD + GET of files), ``head`` or ``get``; ``files`` to filenames matching one of the
        globs; ``times`` to the first N matching requests (``None``: until :meth:`heal`).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if on not in TARGETS:
            raise ValueError(f"unknown target {on!r}; expected one of {TARGETS}")
        default_status = {
            "not_found": 404,
            "unauthorized": 401,
            "gated": 403,
            "forbidden": 403,
            "error": 500,
        }.get(mode, 200)
        fault = Fault(
            mode=mode,
            status=status if status is not None else default_status,
            on=on,
            files=tuple(files),
            times=times,
            stall_s=None if stall_s is None else min(max(stall_s, 0.0), MAX_STALL_S),
            keep_bytes=keep_bytes,
            error_code=error_code,
            error_message=error_message,
        )
        with self._lock:
            self._faults.setdefault(repo_id, []).append(fault)

    def heal(self, repo_id: str | None = None) -> None:
        """Remove the faults of ``repo_id`` (of every repo when ``None``); their stalls end now."""
        with self._lock:
            if repo_id is None:
                removed = [fault for faults in self._faults.values() for fault in faults]
                self._faults.clear()
            else:
                removed = self._faults.pop(repo_id, [])
        for fault in removed:
            fault.released.set()

    def stalled(self, repo_id: str | None = None) -> int:
        """How many requests (for ``repo_id``, or any) a ``stall`` fault is holding right now."""
        with self._lock:
            if repo_id is None:
                return sum(self._stalled.values())
            return self._stalled.get(repo_id, 0)

    def _stall(self, repo_id: str, fault: Fault) -> None:
        """Hold the request for ``fault.stall_s`` (``None``: until healed), or until the server stops."""
        deadline = None if fault.stall_s is None else time.monotonic() + fault.stall_s
        with self._lock:
            self._stalled[repo_id] = self._stalled.get(repo_id, 0) + 1
        try:
            while not self._stopping.is_set() and not fault.released.is_set():
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._stopping.wait(left)
        finally:
            with self._lock:
                self._stalled[repo_id] -= 1

    def _take_fault(self, repo_id: str | None, kind: str, method: str, filename: str | None) -> Fault | None:
        if repo_id is None:
            return None
        with self._lock:
            for fault in self._faults.get(repo_id, []):
                if fault.matches(kind, method, filename):
                    fault.hits += 1
                    return fault
        return None

    # ----------------------------------------------------------------------------- request log

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Filenames fetched with ``GET /resolve`` (whatever the answer), oldest first."""
        return [
            r.filename or ""
            for r in self.requests
            if r.kind == "resolve" and r.method == "GET" and (repo_id is None or r.repo_id == repo_id)
        ]

    def requested_files(self, repo_id: str | None = None) -> set[str]:
        """Filenames touched by any ``HEAD`` or ``GET /resolve``."""
        return {
            r.filename or ""
            for r in self.requests
            if r.kind == "resolve" and (repo_id is None or r.repo_id == repo_id)
        }

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    # ----------------------------------------------------------------------------- routing

    def _find_repo(self, repo_id: str | None) -> Repo | None:
        if repo_id is None:
            return None
        with self._lock:
            return self._repos.get(repo_id)

    def _split_resolve(self, parts: list[str]) -> tuple[str, str, str] | None:
        """``[org, name, "resolve", rev, *file]`` (or a one-segment repo id) -> (repo, revision, file)."""
        for size in (2, 1):
            if len(parts) > size + 2 and parts[size] == "resolve":
                repo_id = "/".join(parts[:size])
                if size == 1 and self._find_repo("/".join(parts[:2])) is not None:
                    continue
                return repo_id, parts[size + 1], "/".join(parts[size + 2 :])
        return None

    def _split_api(self, parts: list[str]) -> tuple[str, str, str | None, str | None] | None:
        """``["api", "models", *repo, ("revision"|"tree"), rev, *path]`` -> (kind, repo, rev, path)."""
        if len(parts) < 3 or parts[:2] != ["api", "models"]:
            return None
        rest = parts[2:]
        for size in (2, 1):
            if len(rest) < size:
                continue
            repo_id = "/".join(rest[:size])
            tail = rest[size:]
            if size == 1 and len(rest) >= 2 and self._find_repo("/".join(rest[:2])) is not None:
                continue
            if not tail:
                return "info", repo_id, None, None
            if tail[0] == "revision" and len(tail) == 2:
                return "info", repo_id, tail[1], None
            if tail[0] == "tree" and len(tail) >= 2:
                return "tree", repo_id, tail[1], "/".join(tail[2:]) or None
        return None


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeHub/1.0"
        _recorded = True  # until ``_handle`` starts a request (``send_error`` on a malformed line)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._handle("HEAD")

        def do_GET(self) -> None:
            self._handle("GET")

        # ------------------------------------------------------------------ dispatch

        def _handle(self, method: str) -> None:
            split = urlsplit(self.path)
            parts = [unquote(p) for p in split.path.split("/") if p]
            query = parse_qs(split.query)
            kind, repo_id, revision, filename = "other", None, None, None
            api = server._split_api(parts)
            if api is not None:
                kind, repo_id, revision, filename = api
            else:
                resolved = server._split_resolve(parts)
                if resolved is not None:
                    kind = "resolve"
                    repo_id, revision, filename = resolved
            self._status = 0
            self._fault_name: str | None = None
            self._recorded = False
            self._request = (method, kind, repo_id, revision, filename)
            try:
                fault = server._take_fault(repo_id, kind, method, filename)
                if fault is not None:
                    self._fault_name = fault.mode
                if fault is not None and fault.mode == "stall" and repo_id is not None:
                    server._stall(repo_id, fault)
                    self._drop()
                elif fault is not None and fault.mode not in BODY_MODES:
                    self._send_fault(fault, method)
                elif kind == "other" or repo_id is None:
                    self._send_json(404, {"error": "Not Found"}, method)
                else:
                    self._serve(kind, method, repo_id, revision, filename, query, fault)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                self._record_once()

        def send_response(self, code: int, message: str | None = None) -> None:
            # Recorded before the status line leaves, so a client that has its answer always finds
            # its request in ``server.requests`` (recording after the body raced the client's check).
            self._status = code
            self._record_once()
            super().send_response(code, message)

        def _record_once(self) -> None:
            if self._recorded:
                return
            self._recorded = True
            method, kind, repo_id, revision, filename = self._request
            server._record(
                RecordedRequest(
                    method=method,
                    path=self.path,
                    kind=kind,
                    repo_id=repo_id,
                    revision=revision,
                    filename=filename,
                    headers=dict(self.headers.items()),
                    status=self._status,
                    fault=self._fault_name,
                )
            )

        def _serve(
            self,
            kind: str,
            method: str,
            repo_id: str,
            revision: str | None,
            filename: str | None,
            query: dict[str, list[str]],
            fault: Fault | None,
        ) -> None:
            repo = server._find_repo(repo_id)
            if repo is None:
                self._send_error(404, "RepoNotFound", "Repository not found", method)
                return
            commit = repo.resolve(revision or "main")
            if commit is None:
                self._send_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", method)
                return
            if kind == "info":
                blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                self._send_json(200, _model_info(repo_id, commit, blobs=blobs), method)
            elif kind == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                self._send_json(200, _tree(commit, filename, recursive), method)
            else:
                entry = commit.files.get(filename or "")
                if entry is None:
                    self._send_error(
                        404, "EntryNotFound", f"{filename} does not exist", method, commit=commit.sha
                    )
                    return
                self._send_file(method, commit, entry, fault)

        # ------------------------------------------------------------------ answers

        def _send_file(self, method: str, commit: Commit, entry: RepoFileData, fault: Fault | None) -> None:
            data = entry.data
            status = 200
            headers = {
                "X-Repo-Commit": commit.sha,
                "ETag": f'"{entry.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if entry.lfs:
                headers["X-Linked-Etag"] = f'"{entry.sha256}"'
                headers["X-Linked-Size"] = str(len(entry.data))
            start = _range_start(self.headers.get("Range"))
            if method == "GET" and start is not None and 0 < start <= len(data):
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data = data[start:]
            if fault is not None and fault.mode == "corrupt":
                data = bytes(255 - byte for byte in data)
            if fault is not None and fault.mode == "short":
                keep = fault.keep_bytes if fault.keep_bytes is not None else len(data) // 2
                data = data[:keep]
            headers["Content-Length"] = str(len(data))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method == "HEAD":
                return
            if fault is not None and fault.mode == "truncate":
                keep = fault.keep_bytes if fault.keep_bytes is not None else len(data) // 2
                if status == 206:
                    keep = 0  # a resume attempt gets nothing: the download cannot complete
                self.wfile.write(data[: min(keep, max(len(data) - 1, 0))])
                self._drop()
                return
            self.wfile.write(data)

        def _send_fault(self, fault: Fault, method: str) -> None:
            code = fault.error_code
            message = fault.error_message
            if code is None:
                code = {
                    "not_found": "RepoNotFound",
                    "unauthorized": "RepoNotFound",
                    "gated": "GatedRepo",
                }.get(fault.mode)
            if message is None:
                message = {
                    "not_found": "Repository not found",
                    "unauthorized": "Invalid username or password.",
                    "gated": "Access to model is restricted. You must have access to it and be authenticated.",
                    "forbidden": "Forbidden",
                }.get(fault.mode, "Internal Error")
            self._send_error(fault.status, code, message, method)

        def _send_error(
            self, status: int, code: str | None, message: str, method: str, *, commit: str | None = None
        ) -> None:
            headers = {"X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            self._send_json(status, {"error": message}, method, headers)

        def _send_json(
            self, status: int, payload: Any, method: str, headers: Mapping[str, str] | None = None
        ) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def _drop(self) -> None:
            """Close the connection without (finishing) an answer."""
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes="):
        return None
    first = value[len("bytes=") :].split(",")[0].split("-")[0].strip()
    return int(first) if first.isdigit() else None


def _model_info(repo_id: str, commit: Commit, *, blobs: bool = False) -> dict[str, Any]:
    """The repo info; with ``?blobs=true`` (``files_metadata=True``) each sibling has size, blob id and,
    for LFS files, ``lfs: {sha256, size, pointerSize}`` as the Hub gives them."""
    siblings: list[dict[str, Any]] = []
    for name in sorted(commit.files):
        sibling: dict[str, Any] = {"rfilename": name}
        if blobs:
            entry = commit.files[name]
            sibling.update(size=len(entry.data), blobId=entry.blob_id)
            if entry.lfs:
                sibling["lfs"] = {"sha256": entry.sha256, "size": len(entry.data), "pointerSize": 134}
        siblings.append(sibling)
    return {
        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "sha": commit.sha,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": ["peft"],
        "lastModified": "2024-01-01T00:00:00.000Z",
        "createdAt": "2024-01-01T00:00:00.000Z",
        "siblings": siblings,
    }


def _tree(commit: Commit, path: str | None, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{path.strip('/')}/" if path else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for name in sorted(commit.files):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        segments = rest.split("/")
        for depth in range(1, len(segments)):
            folder = prefix + "/".join(segments[:depth])
            if (recursive or depth == 1) and folder not in folders:
                folders.add(folder)
                entries.append({"type": "directory", "oid": git_blob_id(folder.encode()), "path": folder})
        if len(segments) > 1 and not recursive:
            continue
        entry = commit.files[name]
        item: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": len(entry.data), "path": name}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": len(entry.data), "pointerSize": 134}
        entries.append(item)
    return entries


def use_hub_server(
    monkeypatch: pytest.MonkeyPatch,
    server: HubServer,
    hf_home: Path,
    *,
    timeout_s: int = 1,
) -> Path:
    """Point ``huggingface_hub`` at ``server`` with a fresh cache under ``hf_home``; returns the hub cache.

    Patches ``huggingface_hub.constants`` (read at import time, so the environment alone is not enough):
    ``ENDPOINT`` and the resolve-URL template, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` (off),
    ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` (``timeout_s``), telemetry off (it would fetch
    ``/api/agent-harnesses`` once per process), and a token path inside ``hf_home`` with ``HF_TOKEN`` unset.
    Set ``huggingface_hub.constants.HF_HUB_OFFLINE`` to ``True`` with ``monkeypatch`` to go offline.
    """
    from huggingface_hub import constants

    cache = hf_home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    patches: dict[str, object] = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.resolve_template,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_ETAG_TIMEOUT": timeout_s,
        "HF_HUB_DOWNLOAD_TIMEOUT": timeout_s,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": str(timeout_s),
        "HF_HUB_DOWNLOAD_TIMEOUT": str(timeout_s),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return cache
