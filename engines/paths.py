"""Where the gateway keeps files it can rebuild at any time (the demo, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$PEFT_GATEWAY_HOME``, else ``peft-gateway`` under ``$XDG_CACHE_HOME``, else under ``~/.cache``."""
    home = os.environ.get("PEFT_GATEWAY_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "peft-gateway"
