"""Parsing of the ``model`` field: ``<base>``, ``<base>+<adapter>``, ``<base>+<adapter>@<revision>``.

Parsing is purely syntactic and runs before anything touches the disk or the network, so that a hostile
name (``..`` components, control characters, absurd lengths) is refused with a 400 instead of becoming a
file read or a Hub request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engines.errors import InvalidModelName

MAX_NAME_LENGTH = 512

_BASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
# Hub repo ids: "org/name", each part starting with an alphanumeric, no "--" or "..".
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,254}$")
# No C0 controls, DEL or C1 controls anywhere (a name is never a place for a newline or an escape).
_PATH_CHARS_RE = re.compile(r"^[^\x00-\x1f\x7f-\x9f]+$")


def is_hub_id(text: str) -> bool:
    """True for strings shaped like a Hub repository id (``org/name``)."""
    return bool(_HUB_ID_RE.fullmatch(text)) and "--" not in text and ".." not in text


def is_alias(text: str) -> bool:
    """True for a bare configured-adapter alias: one path component of safe characters."""
    return bool(_ALIAS_RE.fullmatch(text)) and ".." not in text


def looks_like_path(text: str) -> bool:
    """True when the client clearly meant a filesystem path rather than a Hub id or alias."""
    return text.startswith(("/", "./", "~")) or text.count("/") > 1


@dataclass(frozen=True)
class ModelName:
    """A parsed ``model`` string. ``adapter`` is ``None`` for a bare base."""

    base: str
    adapter: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelName:
        if not isinstance(text, str) or not text.strip():
            raise InvalidModelName("'model' must be a non-empty string.")
        if len(text) > MAX_NAME_LENGTH:
            raise InvalidModelName(f"'model' is longer than {MAX_NAME_LENGTH} characters.")
        # Checked before stripping: str.strip() would silently drop a trailing newline or \x1f.
        if not _PATH_CHARS_RE.fullmatch(text):
            raise InvalidModelName("'model' contains control characters.")
        text = text.strip(" ")
        base, plus, rest = text.partition("+")
        if not _BASE_RE.fullmatch(base) or ".." in base:
            raise InvalidModelName(
                f"'{base}' is not a valid base model name; use '<base>' or '<base>+<adapter>'."
            )
        if not plus:
            return cls(base=base)
        adapter, at, revision = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not adapter:
            raise InvalidModelName(
                f"'{text}' names no adapter after '+'; use '<base>+<org>/<adapter>' or drop the '+'."
            )
        if "+" in adapter:
            raise InvalidModelName(f"'{text}' has more than one '+'; only one adapter can be applied.")
        if at and not (_REVISION_RE.fullmatch(revision) and ".." not in revision):
            raise InvalidModelName(
                f"'{revision}' is not a valid revision; use a branch, tag or commit hash after '@'."
            )
        parts = adapter.replace("\\", "/").split("/")
        if any(part == ".." for part in parts):
            raise InvalidModelName(f"Adapter path '{adapter}' must not contain '..' components.")
        if not (is_hub_id(adapter) or is_alias(adapter) or looks_like_path(adapter)):
            raise InvalidModelName(
                f"'{adapter}' is neither a Hub id ('org/name'), a configured adapter alias, "
                "nor a path under a configured adapter folder."
            )
        return cls(base=base, adapter=adapter, revision=revision or None)

    def __str__(self) -> str:
        if self.adapter is None:
            return self.base
        suffix = f"@{self.revision}" if self.revision else ""
        return f"{self.base}+{self.adapter}{suffix}"
