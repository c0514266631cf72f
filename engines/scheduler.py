"""The engine's decode loop: one worker thread that owns every forward pass.

Running all model work on one thread keeps torch's own thread pool from being oversubscribed on small
CPUs and gives one place to decide what runs next. Each loop iteration admits waiting requests
(prefill), then advances every active sequence by one token, so streams interleave fairly and a
cancelled request is dropped within one step.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from typing import Any

from engines.errors import Overloaded
from engines.sequence import Sequence

log = logging.getLogger("peft_gateway.scheduler")


def _cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class Scheduler:
    """Owns the worker thread; ``submit`` is safe from any thread."""

    def __init__(self, *, max_active: int = 16, max_waiting: int = 64) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="peft-gateway-engine", daemon=True)
        self._cache_kwargs: dict[int, str] = {}
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; 503 when the waiting queue is full rather than an unbounded backlog."""
        with self._cond:
            if self._closed:
                raise Overloaded("The engine is shutting down.")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(
                    f"Too many requests are waiting ({len(self._waiting)}); retry shortly.", retry_after=1
                )
            self._waiting.append(sequence)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for sequence in [*self._waiting, *self._active]:
            if not sequence.finished:
                sequence.fail(Overloaded("The engine shut down before this request finished."))

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._closed:
                        return
                    admitted: list[Sequence] = []
                    while self._waiting and len(self._active) + len(admitted) < self.max_active:
                        admitted.append(self._waiting.popleft())
                for sequence in admitted:
                    self._guarded(sequence, self._prefill)
                    if not sequence.finished:
                        self._active.append(sequence)
                for sequence in list(self._active):
                    if not sequence.finished:
                        self._guarded(sequence, self._decode)
                self._active = [s for s in self._active if not s.finished]

    def _guarded(self, sequence: Sequence, action: Any) -> None:
        if sequence.cancelled:
            sequence.finished = True
            sequence.cache = None
            return
        try:
            action(sequence)
        except Exception as exc:  # a failing forward must end one request, not the engine thread
            log.exception("generation failed for %s", sequence.request.request_id)
            sequence.fail(exc)

    def _forward(self, sequence: Sequence, ids: list[int]) -> None:
        import torch
        from transformers import DynamicCache

        model = sequence.model.model
        key = self._cache_kwargs.get(id(model))
        if key is None:
            key = self._cache_kwargs[id(model)] = _cache_kwarg(model)
        if sequence.cache is None:
            sequence.cache = DynamicCache()
        input_ids = torch.tensor([ids], dtype=torch.long, device=sequence.model.device)
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{key: sequence.cache})
        sequence.logits = output.logits[0, -1]

    def _prefill(self, sequence: Sequence) -> None:
        self._forward(sequence, list(sequence.request.prompt_ids))
        sequence.step()

    def _decode(self, sequence: Sequence) -> None:
        self._forward(sequence, [sequence.last_token()])
        sequence.step()
