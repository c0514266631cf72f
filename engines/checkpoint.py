"""What a checkpoint holds, read from its files' headers without loading a weight.

The loader sizes a load and the budget from these facts before anything is allocated, the streaming
loader reads each tensor from where its header says it lies, and the adapter checks compare an adapter's
tensors with the base's shapes: all of them ask here, so none has to import another to learn a shape.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


#: A safetensors header larger than this is not a model's (a 7B header is about 30 KB).
MAX_HEADER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


class CheckpointError(ValueError):
    """A safetensors file whose header cannot be used."""


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its JSON header alone."""
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{file.name}: header of {length} bytes")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise CheckpointError(f"{file.name}: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name}: header is not an object")
    size = file.stat().st_size
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file.name}: tensor '{name}' has an unusable entry") from exc
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        start = 8 + length + begin
        if end - begin != nbytes or start + nbytes > size:
            raise CheckpointError(f"{file.name}: tensor '{name}' lies outside the file (truncated?)")
        tensors[name] = StoredTensor(file, dtype, shape, start, nbytes)
    return tensors


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a folder's safetensors shards."""
    tensors: dict[str, StoredTensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(file))
    return tensors


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's files say about its size, read without loading a weight."""

    parameters: int
    largest_tensor: int  # elements
    stored_dtype: str
    layers: int
    kv_width: int  # key (or value) elements per token per layer
    context: int
    #: Elements and rows of the 2-D tensors (linear weights and embeddings): what int8 quantizes.
    matrix_parameters: int = 0
    matrix_rows: int = 0

    def kv_bytes_per_token(self, element: int) -> int:
        return 2 * self.layers * self.kv_width * element

    def int8_bytes(self, element: int) -> int:
        """Resident bytes once quantized: int8 matrices, a bf16 scale per row, the rest in ``element``."""
        return (
            self.matrix_parameters
            + 2 * self.matrix_rows
            + (self.parameters - self.matrix_parameters) * element
        )


def checkpoint_facts(folder: Path) -> CheckpointFacts:
    """Parameter count from the safetensors headers (or the size of pickle files), and the config."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    stored = stored if stored in DTYPE_BYTES else "float32"
    tensors = checkpoint_tensors(folder)
    matrices = [t.shape for t in tensors.values() if len(t.shape) == 2]
    if tensors:
        sizes = [math.prod(t.shape) for t in tensors.values()]
    else:
        files = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        sizes = [path.stat().st_size // DTYPE_BYTES[stored] for path in files]
    heads = int(text.get("num_attention_heads") or 1)
    hidden = int(text.get("hidden_size") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    return CheckpointFacts(
        parameters=sum(sizes),
        largest_tensor=max(sizes, default=0),
        stored_dtype=stored,
        layers=int(text.get("num_hidden_layers") or 0),
        kv_width=int(text.get("num_key_value_heads") or heads) * head_dim,
        context=int(text.get("max_position_embeddings") or 2048),
        # Without safetensors headers (pickle checkpoints) every weight counts as a matrix.
        matrix_parameters=sum(rows * cols for rows, cols in matrices) if tensors else sum(sizes),
        matrix_rows=sum(rows for rows, _cols in matrices),
    )
