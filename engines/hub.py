"""Fetching from the Hugging Face Hub through ``huggingface_hub``, with its failures made typed.

Files land in the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), so they are shared with every other
HF tool, and ``huggingface_hub`` only moves a file into place once it is complete, so an interrupted
download never counts as present. ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured by
the library itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from engines.errors import AdapterAccessDenied, ModelNotFound, UpstreamUnavailable

log = logging.getLogger("peft_gateway.hub")

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


def snapshot(
    repo_id: str,
    *,
    revision: str | None,
    allow_patterns: tuple[str, ...],
    token: str | None = None,
    what: str = "adapter",
) -> Path:
    """Download (or find in the cache) ``repo_id`` at ``revision``; typed errors instead of HTTP ones."""
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
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(allow_patterns),
            token=token,
        )
    except GatedRepoError as exc:
        raise AdapterAccessDenied(
            f"The Hub refused access to {what} '{label}' (gated or private). Accept its licence on the Hub "
            "and set HF_TOKEN, or a token for it in the gateway config."
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(f"The {what} '{repo_id}' has no revision '{revision}' on the Hub.") from exc
    except RepositoryNotFoundError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 401:
            raise AdapterAccessDenied(
                f"The Hub answered 401 for {what} '{label}': it does not exist or needs a token "
                "(set HF_TOKEN)."
            ) from exc
        raise ModelNotFound(f"The {what} '{label}' does not exist on the Hub.") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise UpstreamUnavailable(
            f"The {what} '{label}' is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode or no network). Run 'peft-gateway pull' where the Hub is reachable, or unset "
            "HF_HUB_OFFLINE."
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise AdapterAccessDenied(
                f"The Hub answered {status} for {what} '{label}'; set HF_TOKEN to a token with access."
            ) from exc
        raise UpstreamUnavailable(
            f"The Hub failed while fetching {what} '{label}' (HTTP {status}); try again later."
        ) from exc
    except (OSError, ValueError) as exc:
        raise UpstreamUnavailable(f"Could not fetch {what} '{label}' from the Hub: {exc}") from exc
    log.info("fetched %s %s in %.2fs -> %s", what, label, time.perf_counter() - started, folder)
    return Path(folder)
