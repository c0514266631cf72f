"""The demo's models on disk: the shipped prebuilt weights, or a build in the user's cache.

There is no Hugging Face Hub on the machines this project runs on, yet the gateway's whole point (serve a
base model and, under ``base+adapter``, the same model with a LoRA adapter merged) should be visible in a
few seconds with an ordinary chat client. So the demo has its own models (``engines.demo.content`` says
what they answer, ``engines.demo.train`` how they are trained).

The trained weights ship with the package (``engines/demo/weights``, about 1.4 MB), so the first start takes
seconds instead of minutes of training; ``python -m engines.demo --build`` rebuilds them, and a test
rebuilds them and compares. Should the shipped folder be missing or older than the recipe, the demo is
trained into the user's cache on first use instead, as it was before weights were shipped.

Everything is written with the ordinary ``save_pretrained`` calls, so the gateway loads it through exactly
the code that loads a downloaded model and adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.demo.content import (
    DEMO_ADAPTER_NAME,
    DEMO_BASE_NAME,
    DEMO_BASE_REPO_ID,
    DEMO_CHAT_TEMPLATE,
    DEMO_CITIES,
    DEMO_FALLBACK,
    DEMO_NO_TOOL,
    DEMO_QUESTIONS,
    DEMO_WEATHER,
    DEMO_WEATHER_TOOL,
    RESULT_CITIES,
)
from engines.demo.train import DEMO_VERSION, Log, recipe, train_and_save
from engines.paths import cache_home

_MARKER = "demo.json"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class DemoModels:
    """Where the built demo lives: a base model folder and a LoRA adapter folder for it."""

    base_dir: Path
    adapter_dir: Path


def default_demo_dir() -> Path:
    """The demo's home: ``$PEFT_GATEWAY_HOME/demo``, else under ``$XDG_CACHE_HOME``, else ``~/.cache``.

    A cache directory because everything in it can be rebuilt from this module at any time.
    """
    return cache_home() / "demo"


def shipped_demo_dir() -> Path:
    """Where the package keeps the demo's prebuilt weights (written by ``python -m engines.demo --build``)."""
    return Path(__file__).resolve().parent / "weights"


def shipped_demo_models() -> DemoModels | None:
    """The prebuilt demo models that ship with the package, if present and built by this very module."""
    folder = shipped_demo_dir()
    return _models_in(folder) if _is_complete(folder) else None


def ensure_demo_models(
    root: Path | None = None, *, log: Log | None = None, use_shipped: bool = True
) -> DemoModels:
    """Return the demo models: the shipped ones, else those under ``root``, built first if not there yet.

    The shipped weights make the first start take seconds. They count only if their marker matches this
    module (a checkout whose recipe changed without a rebuild falls back to training, with a note saying
    how to rebuild); ``use_shipped=False`` always uses ``root``, for tests of the build itself.

    A build is written into a temporary folder next to its final place and renamed into place only once it
    is complete, marker file included, so a build that was killed halfway never counts as present. A file
    lock on ``root/.lock`` makes a second process wait for the first one's build instead of racing it.
    """
    if use_shipped:
        shipped = shipped_demo_models()
        if shipped is not None:
            return shipped
        if log is not None:
            log(
                f"no up-to-date prebuilt demo weights in {shipped_demo_dir()} "
                "(rebuild them with: python -m engines.demo --build); training them instead"
            )
    root = Path(root) if root is not None else default_demo_dir()
    # Versioned, so that a new version of the demo never has to delete a build a running server may use.
    final = root / f"v{DEMO_VERSION}"
    models = _models_in(final)
    if _is_complete(final):
        return models
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _is_complete(final):  # built by another process while this one waited for the lock
            return models
        for leftover in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
        tmp.chmod(0o755)  # mkdtemp's private 0700 would hide a shared cache from other users
        log = log or (lambda _message: None)
        log(f"building the demo models in {root}…")
        try:
            _build(tmp, log)
            if final.exists():  # an incomplete or outdated build: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return models


def _models_in(folder: Path) -> DemoModels:
    return DemoModels(base_dir=folder / "base", adapter_dir=folder / "adapter")


def _marker_content() -> dict[str, Any]:
    """What ``demo.json`` holds: everything that decides what gets built, so a stale build never counts."""
    return {
        "version": DEMO_VERSION,
        "base": DEMO_BASE_NAME,
        "adapter": DEMO_ADAPTER_NAME,
        "base_model_name_or_path": DEMO_BASE_REPO_ID,
        "questions": {question: list(answers) for question, answers in DEMO_QUESTIONS.items()},
        "fallback": list(DEMO_FALLBACK),
        "tools": [DEMO_WEATHER_TOOL],
        "result_cities": list(RESULT_CITIES),
        "cities": DEMO_CITIES,
        "weather": DEMO_WEATHER,
        "no_tool": list(DEMO_NO_TOOL),
        "chat_template": DEMO_CHAT_TEMPLATE,
        "recipe": recipe(),
    }


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of this very version of the demo."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker == _marker_content())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(folder: Path, log: Log) -> None:
    """Train and save the base model and the adapter into ``folder``, the marker file last."""
    models = _models_in(folder)
    started = time.perf_counter()
    train_and_save(models.base_dir, models.adapter_dir, log)
    (folder / _MARKER).write_text(
        json.dumps(_marker_content(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    log(f"demo models ready in {time.perf_counter() - started:.1f}s")


def build_into(folder: Path, *, log: Log | None = None) -> DemoModels:
    """Build the demo into ``folder`` (replaced only once the new build is complete and verified)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder.parent))
    tmp.chmod(0o755)
    try:
        _build(tmp, log or (lambda _message: None))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _models_in(folder)
