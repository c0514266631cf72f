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

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engines.errors import AdapterAccessDenied, ModelNotFound, UpstreamUnavailable

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
BASE_FILES = (
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
    "tokenizer*",
)


class _DeadlineExceeded(Exception):
    """The fetch did not finish within the ``timeout`` given to :func:`snapshot`."""


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
    """Download (or find in the cache) ``repo_id`` at ``revision``; typed errors instead of HTTP ones.

    ``endpoint`` and ``cache_dir`` default to ``huggingface_hub``'s own (``HF_ENDPOINT``, ``HF_HUB_CACHE``).
    ``timeout`` bounds the whole fetch in seconds (``None``: as long as ``huggingface_hub`` takes).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    started = time.perf_counter()
    label = f"{repo_id}@{revision}" if revision else repo_id

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
        folder = _call_with_deadline(download, timeout, name=f"hub fetch {label}")
    except _DeadlineExceeded as exc:
        raise UpstreamUnavailable(
            f"The Hub did not deliver {what} '{label}' within {timeout:g}s; try again later."
        ) from exc
    except GatedRepoError as exc:
        raise AdapterAccessDenied(
            f"The Hub refused access to {what} '{label}' (gated or private). Accept its licence on the Hub "
            "and set HF_TOKEN, or a token for it in the gateway config."
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(f"The {what} '{repo_id}' has no revision '{revision}' on the Hub.") from exc
    except RepositoryNotFoundError as exc:
        if _status(exc) == 401:
            raise AdapterAccessDenied(
                f"The Hub answered 401 for {what} '{label}': it does not exist or is private and needs a "
                "token (set HF_TOKEN)."
            ) from exc
        raise ModelNotFound(f"The {what} '{label}' does not exist on the Hub.") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if _is_offline(exc, OfflineModeIsEnabled):
            raise ModelNotFound(
                f"The {what} '{label}' is not (completely) in the local Hugging Face cache, and HF_HUB_OFFLINE "
                "is set so the Hub is not asked. Run 'peft-gateway pull' where the Hub is reachable, or "
                "unset HF_HUB_OFFLINE."
            ) from exc
        status = _status(_cause(exc, HfHubHTTPError))
        if status in (401, 403):
            raise AdapterAccessDenied(
                f"The Hub answered {status} for {what} '{label}'; set HF_TOKEN to a token with access."
            ) from exc
        detail = f" (HTTP {status})" if status is not None else ""
        raise UpstreamUnavailable(
            f"The Hub could not be reached or failed{detail} while fetching {what} '{label}', and it is not "
            "in the local Hugging Face cache; try again later."
        ) from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise AdapterAccessDenied(
                f"The Hub answered {status} for {what} '{label}'; set HF_TOKEN to a token with access."
            ) from exc
        raise UpstreamUnavailable(
            f"The Hub failed while fetching {what} '{label}' (HTTP {status}); try again later."
        ) from exc
    except _transport_errors() as exc:
        raise UpstreamUnavailable(
            f"The connection to the Hub failed while fetching {what} '{label}' "
            f"({type(exc).__name__}: {exc}); try again later."
        ) from exc
    except (OSError, ValueError) as exc:
        raise UpstreamUnavailable(f"Could not fetch {what} '{label}' from the Hub: {exc}") from exc
    log.info("fetched %s %s in %.2fs -> %s", what, label, time.perf_counter() - started, folder)
    return Path(folder)


def _call_with_deadline(fn: Callable[[], T], timeout: float | None, *, name: str) -> T:
    """``fn()``, but give up waiting after ``timeout`` seconds (``fn`` then finishes in the background)."""
    if timeout is None:
        return fn()
    outcome: dict[str, Any] = {}
    done = threading.Event()
    abandoned = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller, or logged if it has given up
            outcome["error"] = exc
            if abandoned.is_set():
                log.warning("%s failed after its caller gave up: %s", name, exc)
        finally:
            done.set()

    # A daemon thread: a fetch stuck on a silent socket must not keep the process from exiting.
    threading.Thread(target=work, name=name, daemon=True).start()
    if not done.wait(timeout):
        abandoned.set()
        raise _DeadlineExceeded(name)
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


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


@dataclass(frozen=True)
class CachedAdapter:
    """A LoRA adapter already in the local HF cache, usable offline."""

    repo_id: str
    folder: Path
    base_model: str | None


def cached_adapters(cache_dir: str | Path | None = None) -> list[CachedAdapter]:
    """Adapters found in the HF cache (one entry per repo: its newest snapshot), without any network."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    found: dict[str, CachedAdapter] = {}
    for config in sorted(
        root.glob("models--*/snapshots/*/adapter_config.json"), key=lambda p: p.stat().st_mtime
    ):
        repo_folder = config.parents[2].name  # models--org--name
        repo_id = repo_folder.removeprefix("models--").replace("--", "/", 1)
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
            continue
        base = data.get("base_model_name_or_path")
        found[repo_id] = CachedAdapter(
            repo_id=repo_id, folder=config.parent, base_model=str(base) if base else None
        )
    return list(found.values())
