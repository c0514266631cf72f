"""Fetching from the Hugging Face Hub through ``huggingface_hub``, with its failures made typed.

Files land in the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), so they are shared with every other
HF tool, and ``huggingface_hub`` only moves a file into place once it is complete, so an interrupted
download never counts as present. ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured by
the library itself (it reads them into ``huggingface_hub.constants`` when it is imported).

How ``huggingface_hub`` 2.x reports failures, and what they become here:

- repo missing: ``RepositoryNotFoundError`` (404) -> :class:`ModelNotFound`; the Hub answers 401 instead of
  404 to a caller without a token (it does not say whether a private repo exists) -> ``AdapterAccessDenied``
  telling the user to set ``HF_TOKEN``;
- gated: ``GatedRepoError`` (401/403) -> :class:`AdapterAccessDenied`; a plain 403 arrives wrapped in a
  ``LocalEntryNotFoundError`` (``snapshot_download`` first looks for a cached copy) and is unwrapped;
- unknown revision: ``RevisionNotFoundError`` -> :class:`ModelNotFound`;
- ``HF_HUB_OFFLINE`` set and nothing (complete) cached: ``LocalEntryNotFoundError`` caused by
  ``OfflineModeIsEnabled`` -> :class:`ModelNotFound` saying so;
- Hub down, 5xx, network unreachable, timeouts: ``LocalEntryNotFoundError`` when the metadata calls fail,
  but *raw* ``httpx2`` errors (``ReadTimeout``, ``RemoteProtocolError``) when a stalled API call or a cut
  download fails after the library's own retries, and ``OSError`` when a body is shorter than announced
  -> :class:`UpstreamUnavailable`.

``huggingface_hub`` 2.4 sends its metadata calls (revision info, file listing) without any timeout and
retries stalled HEAD calls for minutes, so a Hub that accepts connections but never answers would block a
fetch for a very long time; ``timeout=`` bounds the wait (the download goes on in the background and, if
it completes, lands in the cache for the next attempt).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engines.errors import (
    AdapterAccessDenied,
    EngineError,
    FetchCancelled,
    ModelNotFound,
    UpstreamIntegrityError,
    UpstreamUnavailable,
    UpstreamUnreachable,
    public_text,
)

log = logging.getLogger("peft_gateway.hub")

T = TypeVar("T")

ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "*.model",
)
#: A base's files, weights as safetensors only: a repo that also ships ``*.bin`` copies of them (Llama-2
#: does) must not cost a second download of the model. ``BASE_PICKLE_FILES`` are fetched only for a repo
#: without safetensors weights (see ``engines.loader.base_folder``).
BASE_FILES = (
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
    "tokenizer*",
)
BASE_PICKLE_FILES = ("*.bin",)


class _DeadlineExceeded(Exception):
    """The fetch did not finish within the fetcher's ``timeout``."""


class _Cancelled(Exception):
    """:meth:`HubFetcher.cancel` was called while the fetch waited."""


#: How many failed lookups the negative cache remembers (invented names must not grow it without bound).
NEGATIVE_CACHE_ENTRIES = 1024


class HubFetcher:
    """The engine's door to the Hub: deadline, shutdown cancellation, negative cache, cache hygiene.

    One per engine (``Engine.hub``), never a module global. It adds to ``huggingface_hub``:

    - a deadline per fetch (``[hub] fetch_timeout``) and :meth:`cancel`, which makes every waiting fetch
      (and every later one) fail at once, so shutdown is not held by a stalled Hub;
    - a short negative cache (``[hub] negative_cache_seconds``) of the Hub's "no such repo / revision /
      no access" answers, so repeated requests for a missing adapter do not call the Hub each time;
    - sha256 verification of the files the Hub lists with one (see :func:`verify_snapshot`);
    - removal of ``.incomplete`` leftovers of killed downloads of the repo it fetches.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        negative_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._waiting: set[threading.Event] = set()
        self._negative: dict[tuple[str, str, str, str], tuple[float, EngineError]] = {}
        #: Download threads still running per repo cache folder (abandoned ones included).
        self._live: dict[str, int] = {}
        #: (blob path, size, mtime_ns) of files whose sha256 was checked, so a hit costs no hashing.
        self._verified: set[tuple[str, int, int]] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Fail every fetch now waiting on the Hub, and every later one (called at shutdown)."""
        self._cancelled.set()
        with self._lock:
            waiting = list(self._waiting)
        for event in waiting:
            event.set()

    def snapshot(
        self,
        repo_id: str,
        *,
        revision: str | None,
        allow_patterns: tuple[str, ...],
        token: str | None = None,
        what: str = "adapter",
        endpoint: str | None = None,
        cache_dir: str | Path | None = None,
        deadline: bool = True,
    ) -> Path:
        """Download (or find in the cache) ``repo_id`` at ``revision``; typed errors instead of HTTP ones.

        ``endpoint`` and ``cache_dir`` default to ``huggingface_hub``'s own (``HF_ENDPOINT``, ``HF_HUB_CACHE``).
        ``deadline=False`` (base models: many GB) waits without ``timeout``, but still ends at
        :meth:`cancel`, so a stalled base download does not hold shutdown either.
        """
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        label = f"{repo_id}@{revision}" if revision else repo_id
        if self.cancelled:
            raise FetchCancelled(f"The gateway is shutting down; {what} '{label}' is not fetched.")
        hub_url = endpoint or constants.ENDPOINT
        # The token is part of the key: a repo refused without one may be readable with another.
        key = (hub_url, repo_id, revision or "main", token or "")
        remembered = self._remembered(key)
        if remembered is not None:
            raise remembered
        cache_root = Path(cache_dir or constants.HF_HUB_CACHE)
        repo_folder = cache_root / repo_folder_name(repo_id=repo_id, repo_type="model")
        self._clean_incomplete(repo_folder)
        started = time.perf_counter()

        def download() -> str:
            return snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow_patterns),
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
            )

        try:
            timeout = self.timeout if deadline else None
            folder = Path(self._run(download, str(repo_folder), name=f"hub fetch {label}", timeout=timeout))
        except _Cancelled as exc:
            raise FetchCancelled(
                f"The gateway is shutting down; the fetch of {what} '{label}' was cancelled."
            ) from exc
        except _DeadlineExceeded as exc:
            raise UpstreamUnavailable(
                f"The Hub did not deliver {what} '{label}' within {self.timeout:g}s ([hub] fetch_timeout); "
                "try again later."
            ) from exc
        except Exception as exc:  # every failure is translated; unknown ones re-raised
            error = translate_error(exc, what=what, label=label, endpoint=hub_url)
            if error is None:
                raise
            if _is_hub_answer(exc):
                self._remember(key, error)
            raise error from exc
        verify_snapshot(folder, what=what, label=label, verified=self._verified)
        self._clean_incomplete(repo_folder)
        log.info("fetched %s %s in %.2fs -> %s", what, label, time.perf_counter() - started, folder)
        return folder

    # ------------------------------------------------------------------ negative cache

    def _remembered(self, key: tuple[str, str, str, str]) -> EngineError | None:
        with self._lock:
            hit = self._negative.get(key)
            if hit is None:
                return None
            expires, error = hit
            if self._clock() >= expires:
                del self._negative[key]
                return None
        log.debug("negative cache hit for %s", key[1])
        return type(error)(error.message)

    def _remember(self, key: tuple[str, str, str, str], error: EngineError) -> None:
        if self.negative_ttl <= 0:
            return
        with self._lock:
            now = self._clock()
            for old in [k for k, (expires, _e) in self._negative.items() if expires <= now]:
                del self._negative[old]
            while len(self._negative) >= NEGATIVE_CACHE_ENTRIES:
                del self._negative[next(iter(self._negative))]  # oldest first (insertion order)
            self._negative[key] = (now + self.negative_ttl, error)

    # ------------------------------------------------------------------ waiting with deadline and cancel

    def _run(self, fn: Callable[[], T], repo_folder: str, *, name: str, timeout: float | None) -> T:
        """``fn()`` on a daemon thread; give up at the deadline or on :meth:`cancel` (it then finishes alone)."""
        outcome: dict[str, Any] = {}
        wake = threading.Event()
        done = threading.Event()
        with self._lock:
            self._live[repo_folder] = self._live.get(repo_folder, 0) + 1
            self._waiting.add(wake)

        def work() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # handed to the caller, or logged if it has given up
                outcome["error"] = exc
                if "abandoned" in outcome:
                    log.warning("%s failed after its caller gave up: %s", name, exc)
            finally:
                with self._lock:
                    self._live[repo_folder] -= 1
                    if not self._live[repo_folder]:
                        del self._live[repo_folder]
                done.set()
                wake.set()

        # A daemon thread: a fetch stuck on a silent socket must not keep the process from exiting.
        try:
            threading.Thread(target=work, name=name, daemon=True).start()
            if self.cancelled:
                wake.set()
            wake.wait(timeout)
        finally:
            with self._lock:
                self._waiting.discard(wake)
        if not done.is_set():
            outcome["abandoned"] = True
            raise _Cancelled(name) if self.cancelled else _DeadlineExceeded(name)
        if "error" in outcome:
            raise outcome["error"]
        value: T = outcome["value"]
        return value

    # ------------------------------------------------------------------ cache hygiene

    def _clean_incomplete(self, repo_folder: Path) -> None:
        """Remove ``blobs/*.incomplete`` of ``repo_folder`` that no download is writing.

        ``huggingface_hub`` writes each download to a file of its own (``<etag>.<random>.incomplete``) and
        never resumes another process's, so a killed download's file is garbage forever. Files of a
        download still running in this process (even one whose caller gave up) are kept, and so are files
        whose blob lock another process holds.
        """
        with self._lock:
            if self._live.get(str(repo_folder)):
                return
        blobs = repo_folder / "blobs"
        try:
            leftovers = sorted(blobs.glob("*.incomplete"))
        except OSError:
            return
        if not leftovers:
            return
        from filelock import FileLock, Timeout

        locks = repo_folder.parent / ".locks" / repo_folder.name
        for path in leftovers:
            etag = path.name.split(".", 1)[0]
            lock_file = locks / f"{etag}.lock"
            try:
                if lock_file.exists():
                    with FileLock(str(lock_file), timeout=0):
                        path.unlink(missing_ok=True)
                else:
                    path.unlink(missing_ok=True)
            except Timeout:
                continue  # another process is downloading this blob right now
            except OSError as exc:
                log.warning("could not remove stale download %s: %s", path, exc)
                continue
            log.info("removed stale partial download %s", path)


def snapshot(
    repo_id: str,
    *,
    revision: str | None,
    allow_patterns: tuple[str, ...],
    token: str | None = None,
    what: str = "adapter",
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float | None = None,
) -> Path:
    """:meth:`HubFetcher.snapshot` with a one-off fetcher (``timeout`` bounds the whole fetch in seconds)."""
    return HubFetcher(timeout=timeout, negative_ttl=0).snapshot(
        repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        token=token,
        what=what,
        endpoint=endpoint,
        cache_dir=cache_dir,
    )


def translate_error(exc: BaseException, *, what: str, label: str, endpoint: str) -> EngineError | None:
    """The typed engine error for a ``snapshot_download`` failure, ``None`` for one that is not the Hub's."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = label.split("@", 1)[0]
    revision = label.split("@", 1)[1] if "@" in label else None
    if isinstance(exc, GatedRepoError):
        return AdapterAccessDenied(
            f"The Hub refused access to {what} '{label}' (gated or private). Accept its licence on the Hub "
            "and set HF_TOKEN, or a token for it in the gateway config."
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(f"The {what} '{repo_id}' has no revision '{revision}' on the Hub.")
    if isinstance(exc, RepositoryNotFoundError):
        if _status(exc) == 401:
            return AdapterAccessDenied(
                f"The Hub answered 401 for {what} '{label}': it does not exist or is private and needs a "
                "token (set HF_TOKEN)."
            )
        return ModelNotFound(f"The {what} '{label}' does not exist on the Hub.")
    unreachable = _unreachable_cause(exc)
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        if _is_offline(exc, OfflineModeIsEnabled):
            return ModelNotFound(
                f"The {what} '{label}' is not (completely) in the local Hugging Face cache, and HF_HUB_OFFLINE "
                "is set so the Hub is not asked. Run 'peft-gateway pull' where the Hub is reachable, or "
                "unset HF_HUB_OFFLINE."
            )
        status = _status(_cause(exc, HfHubHTTPError))
        if status in (401, 403):
            return AdapterAccessDenied(
                f"The Hub answered {status} for {what} '{label}'; set HF_TOKEN to a token with access."
            )
        if unreachable is not None:
            return _unreachable(what, label, endpoint, unreachable)
        detail = f"answered HTTP {status}" if status is not None else f"failed ({_cause_text(exc)})"
        return UpstreamUnavailable(
            f"The Hub {detail} while fetching {what} '{label}', and it is not in the local Hugging Face "
            "cache; try again later."
        )
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status in (401, 403):
            return AdapterAccessDenied(
                f"The Hub answered {status} for {what} '{label}'; set HF_TOKEN to a token with access."
            )
        return UpstreamUnavailable(
            f"The Hub failed while fetching {what} '{label}' (HTTP {status}); try again later."
        )
    if unreachable is not None:
        return _unreachable(what, label, endpoint, unreachable)
    if isinstance(exc, _transport_errors()):
        return UpstreamUnavailable(
            f"The connection to the Hub failed while fetching {what} '{label}' "
            f"({type(exc).__name__}: {public_text(exc)}); try again later."
        )
    if isinstance(exc, OSError | ValueError):
        return UpstreamUnavailable(f"Could not fetch {what} '{label}' from the Hub: {public_text(exc)}")
    return None


def _unreachable(what: str, label: str, endpoint: str, cause: str) -> UpstreamUnreachable:
    return UpstreamUnreachable(
        f"The Hub at {endpoint} cannot be reached ({cause}), so {what} '{label}' could not be fetched, and "
        "it is not in the local Hugging Face cache. This server has no route to the Hub: check its network "
        "or HF_ENDPOINT, or 'peft-gateway pull' the adapter where the Hub is reachable."
    )


def _is_hub_answer(exc: BaseException) -> bool:
    """True for the Hub's own "no such repo / revision / no access" answers, which are worth remembering."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(exc, GatedRepoError | RepositoryNotFoundError | RevisionNotFoundError)


_UNREACHABLE_TEXTS = (
    ("connection refused", "connection refused"),
    ("name or service not known", "DNS lookup failed"),
    ("nodename nor servname", "DNS lookup failed"),
    ("temporary failure in name resolution", "DNS lookup failed"),
    ("getaddrinfo failed", "DNS lookup failed"),
    ("no address associated", "DNS lookup failed"),
    ("network is unreachable", "network unreachable"),
    ("no route to host", "no route to host"),
)


def _unreachable_cause(exc: BaseException) -> str | None:
    """Why the Hub cannot be reached at all (refused, DNS, no route), ``None`` for other failures.

    These are told apart from transient failures (5xx, timeouts, cut downloads) because retrying
    within seconds cannot help them.
    """
    import errno
    import socket

    for item in _chain(exc):
        if isinstance(item, socket.gaierror):
            return "DNS lookup failed"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, OSError) and item.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "no route to host"
        if type(item).__name__ == "ConnectError" or isinstance(item, OSError):
            text = str(item).lower()
            for needle, cause in _UNREACHABLE_TEXTS:
                if needle in text:
                    return cause
    return None


def _cause_text(exc: BaseException) -> str:
    root = _chain(exc)[-1]
    return f"{type(root).__name__}: {public_text(root)}"[:200]


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def verify_snapshot(
    folder: Path, *, what: str, label: str, verified: set[tuple[str, int, int]] | None = None
) -> None:
    """Check every file of a cached snapshot against the sha256 the Hub gave for it.

    The expected hashes come from the Hub's file listing (``lfs.sha256``, which ``huggingface_hub``
    keeps in the cache's ``trees/<commit>.json``) and from the blob's own name (``huggingface_hub``
    stores an LFS file under the sha256 the Hub announced in ``X-Linked-Etag``). A file that does not
    hash to them is removed from the cache, blob and snapshot link both, so the next attempt downloads it
    again instead of serving bad bytes for good. ``verified`` remembers files already checked.
    """
    listed = _listed_sha256(folder)
    for path in sorted(folder.rglob("*")):
        try:
            if not path.is_file():
                continue
            blob = path.resolve()
            stat = blob.stat()
        except OSError:
            continue
        relative = path.relative_to(folder).as_posix()
        expected = {sha for sha in (listed.get(relative), blob.name) if sha and _SHA256_RE.fullmatch(sha)}
        if not expected:
            continue
        memo = (str(blob), stat.st_size, stat.st_mtime_ns)
        if verified is not None and memo in verified:
            continue
        actual = _sha256(blob)
        if expected == {actual}:
            if verified is not None:
                if len(verified) > 100_000:
                    verified.clear()
                verified.add(memo)
            continue
        want = sorted(expected - {actual})[0]
        log.error(
            "sha256 mismatch for %s %s file %s (%s): got %s, the Hub lists %s; removing it from the cache",
            what,
            label,
            relative,
            blob,
            actual,
            want,
        )
        for victim in (path, blob):
            try:
                victim.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", victim, exc)
        raise UpstreamIntegrityError(
            f"The Hub sent {what} '{label}' file '{relative}' with sha256 {actual[:16]}..., but lists it with "
            f"sha256 {want[:16]}...: the download is corrupt or was tampered with. It was not kept in the "
            "cache; if this persists, the Hub or a proxy in between serves wrong data."
        )


def _listed_sha256(folder: Path) -> dict[str, str]:
    """``{path: sha256}`` of the LFS files in the Hub's listing of the snapshot's commit, if cached.

    ``huggingface_hub`` 2.x saves the listing it fetched (``list_repo_tree``, with ``lfs.sha256``) next to
    the snapshots; older versions do not, and then only the blob names are checked.
    """
    try:
        from huggingface_hub._tree_cache import read_tree_cache

        entries = read_tree_cache(str(folder.parents[1]), folder.name)
    except Exception:  # a private module: any change in it only loses this check
        return {}
    listed: dict[str, str] = {}
    for path, entry in (entries or {}).items():
        sha = getattr(entry, "lfs_sha256", None)
        if isinstance(sha, str):
            listed[path] = sha.lower()
    return listed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _status(exc: BaseException | None) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__`` / ``__context__``), nearest first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not other for other in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((item for item in _chain(exc) if isinstance(item, kind)), None)


def _is_offline(exc: BaseException, offline_error: type[BaseException]) -> bool:
    if _cause(exc, offline_error) is not None:
        return True
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP client ``huggingface_hub`` uses (httpx2, httpx, requests).

    They are not ``OSError``s, and ``snapshot_download`` lets some through unwrapped: a stalled API call
    (``RemoteProtocolError`` / ``ReadTimeout``) or a download cut short on every retry.
    """
    classes: list[type[BaseException]] = []
    for module, attribute in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        cls = getattr(imported, attribute, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            classes.append(cls)
    return tuple(classes)
