"""Blocking model work (loading, merging) off the event loop, on a thread that ends with the work.

``asyncio.to_thread`` would reuse a pool of long-lived threads, and that slows every later decode step:
torch's OpenMP runtime (libgomp) gives each thread that runs a parallel operation its own team of worker
threads for as long as that thread lives. Once there are more OpenMP threads than CPUs, libgomp cuts the
spinning of every team short, so each of the hundreds of small parallel regions in a decode step waits
for its workers to be woken. On the 2-core development machine one adapter merged on a pooled thread
made the base's bf16 decode step markedly slower for the rest of the process's life (figures in
bench/README.md). A new thread per load (seconds of work) costs nothing and its OpenMP team goes with
it, leaving the engine thread's team the only one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_on_own_thread(function: Callable[..., T], *args: object, name: str = "peft-gateway-load") -> T:
    """``await function(*args)`` computed on a fresh thread; exceptions propagate to the awaiting task.

    Like ``asyncio.to_thread``, cancelling the awaiting task does not stop the thread; its result is
    then dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle_result(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def settle_error(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def work() -> None:
        try:
            result = function(*args)
        except BaseException as error:  # handed to the awaiting task, as to_thread does
            loop.call_soon_threadsafe(settle_error, error)
        else:
            loop.call_soon_threadsafe(settle_result, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future
