"""Typed failures of the engine layer.

Each carries enough for the gateway to build an OpenAI error without guessing: the HTTP layer maps the
class to a status code in one place (``gateway/errors.py``); the message is written for the client.
"""

from __future__ import annotations

import re

# An absolute POSIX or Windows path (two components at least), as library messages embed them.
_PATH_RE = re.compile(r"(?:(?<![\w.])/|\b[A-Za-z]:[\\/])(?:[^\s'\"`/\\:]+[/\\])+[^\s'\"`/\\:,;)]*")


def public_text(exc: BaseException) -> str:
    """``str(exc)`` with every absolute path cut to its last component, for a client's eyes.

    Library errors (transformers, safetensors, peft) quote the files they failed on; the client may see
    what went wrong but not where the server keeps its files. The log keeps the full text.
    """

    def last_part(match: re.Match[str]) -> str:
        tail = re.split(r"[/\\]", match.group(0).rstrip("/\\"))[-1]
        return f".../{tail}" if tail else "..."

    return _PATH_RE.sub(last_part, str(exc))


class EngineError(Exception):
    """Base class: something about a request the engine cannot serve."""

    #: OpenAI ``param`` the failure is about, if any.
    param: str | None = None
    #: OpenAI ``code``, if a machine-readable one exists.
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class InvalidModelName(EngineError):
    """The ``model`` string cannot be a base, a base+adapter, or a pinned revision (400)."""

    param = "model"
    code = "invalid_model_name"


class ModelNotFound(EngineError):
    """No configured base, alias, adapter or local folder by that name (404)."""

    param = "model"
    code = "model_not_found"


class AdapterRejected(EngineError):
    """The adapter exists but cannot be applied to this base (400)."""

    param = "model"
    code = "invalid_adapter"


class AdapterAccessDenied(EngineError):
    """The Hub refused access to a gated or private repository (401/403 from the Hub)."""

    param = "model"
    code = "adapter_access_denied"


class UpstreamUnavailable(EngineError):
    """The Hub failed in a way a retry may fix (5xx, timeout, cut download), nothing usable cached (503)."""

    param = "model"
    code = "upstream_unavailable"
    #: Whether asking again soon can help: the gateway sends ``Retry-After`` only then, and otherwise
    #: ``x-should-retry: false`` so that the openai SDK does not retry pointlessly.
    retryable = True


class UpstreamUnreachable(UpstreamUnavailable):
    """No route to the Hub at all (connection refused, DNS failure, network unreachable) (502)."""

    code = "upstream_unreachable"
    retryable = False


class UpstreamIntegrityError(UpstreamUnavailable):
    """A file from the Hub does not match the sha256 the Hub lists for it; nothing was cached (502)."""

    code = "upstream_integrity_error"
    retryable = False


class FetchCancelled(UpstreamUnavailable):
    """The gateway is shutting down and cancelled a Hub fetch (503: another instance may serve it)."""

    code = "fetch_cancelled"


class ModelLoadFailed(EngineError):
    """Weights on disk could not be loaded (corrupt or incompatible files)."""

    param = "model"
    code = "model_load_failed"


class ContextLengthExceeded(EngineError):
    """Prompt plus requested completion does not fit the model's context (400)."""

    param = "messages"
    code = "context_length_exceeded"


class InvalidGenerationRequest(EngineError):
    """A generation parameter the engine cannot honour for this model (400)."""


class Overloaded(EngineError):
    """No capacity now (memory budget or queue); the client should retry later (503)."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int | None = 1) -> None:
        super().__init__(message)
        #: ``None``: retrying cannot help (the need exceeds the whole budget); clients are told not to.
        self.retry_after = retry_after


class InsufficientMemory(Overloaded):
    """The work needs more memory than the budget could ever give it: 503 that says what to change."""

    code = "insufficient_memory"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=None)
