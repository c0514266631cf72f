"""Adapters shipped only as ``adapter_model.bin``: read safely once, then served from a safetensors copy.

Many real adapters (FlagAlpha/Llama2-Chinese-7b-Chat-LoRA among them) exist only as pickle. Pickle can
run code when loaded, so the file is read with torch's weights-only unpickler, which rebuilds tensors
and plain containers and refuses every other global before anything runs. What it yields must be a flat
mapping of names to tensors; anything else is refused. The tensors are written once as safetensors in
the gateway's own cache, keyed by the pickle's sha256, so later loads (and every other process sharing
the cache) read safetensors and never unpickle again. The Hub cache itself is left as downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from engines.errors import AdapterRejected, public_text

log = logging.getLogger("peft_gateway.pickle_weights")

#: A LoRA adapter's pickle; far larger ones are refused before unpickling (a 7B rank-64 adapter is 640 MB).
MAX_PICKLE_BYTES = 4 * 2**30


def converted_root() -> Path:
    """Where safetensors copies live: beside the Hugging Face cache (``$HF_HOME/peft-gateway``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "peft-gateway" / "converted-adapters"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_copy(pickle_file: Path, config: dict[str, Any], adapter: str) -> Path:
    """The safetensors copy of ``pickle_file`` (made now if missing), in a folder with its config.

    The folder holds ``adapter_config.json`` too, so peft can load it like the original. ``adapter`` is
    the adapter's public name (never a server path): it goes into the messages.
    """
    size = pickle_file.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise AdapterRejected(
            f"Adapter '{adapter}' has a {size / 2**20:.0f} MiB adapter_model.bin, larger than any LoRA "
            f"adapter this gateway reads ({MAX_PICKLE_BYTES / 2**30:.0f} GiB)."
        )
    folder = converted_root() / file_sha256(pickle_file)
    target = folder / "adapter_model.safetensors"
    if target.is_file():
        return target
    tensors = read_pickle_tensors(pickle_file, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "adapter_config.json", lambda path: path.write_text(json.dumps(config)))
    _write_atomically(target, lambda path: _save(tensors, path))
    log.info("converted pickle weights of adapter %s to safetensors (%s)", adapter, folder.name[:12])
    return target


def read_pickle_tensors(pickle_file: Path, adapter: str) -> dict[str, Any]:
    """Unpickle with torch's weights-only loader; refuse anything but a flat ``{str: Tensor}`` mapping."""
    import torch

    try:
        state = torch.load(pickle_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        # The weights-only unpickler raises UnpicklingError naming the global it refused; a damaged
        # file raises the others. Either way no code from the file ran.
        raise AdapterRejected(
            f"Adapter '{adapter}': adapter_model.bin holds something other than tensors, or is damaged, "
            f"so it was refused without running it ({_first_line(exc)})."
        ) from exc
    if not isinstance(state, dict) or not state:
        raise AdapterRejected(f"Adapter '{adapter}': adapter_model.bin is not a mapping of tensors.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterRejected(
                f"Adapter '{adapter}': adapter_model.bin entry {str(key)[:80]!r} is not a named tensor."
            )
    return state


def _first_line(exc: BaseException) -> str:
    """The error's first line for the client, any server path in it cut to its last component."""
    text = public_text(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _save(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), {"format": "pt"})


def _write_atomically(target: Path, write: Any) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half file under ``target``."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
