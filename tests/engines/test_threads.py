"""Blocking work runs on a fresh thread that ends with it, and its outcome reaches the awaiting task."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engines.threads import run_on_own_thread


def test_the_result_comes_back_from_a_thread_that_then_ends() -> None:
    seen: list[threading.Thread] = []

    def work(x: int, y: int) -> int:
        seen.append(threading.current_thread())
        return x + y

    assert asyncio.run(run_on_own_thread(work, 2, 3)) == 5
    (thread,) = seen
    assert thread is not threading.main_thread()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_an_exception_reaches_the_awaiting_task() -> None:
    def fail() -> None:
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        asyncio.run(run_on_own_thread(fail))


def test_cancelling_the_waiter_drops_the_late_result() -> None:
    release = threading.Event()
    finished = threading.Event()

    def slow() -> str:
        release.wait(5)
        finished.set()
        return "late"

    async def scenario() -> None:
        task = asyncio.ensure_future(run_on_own_thread(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await asyncio.to_thread(finished.wait, 5)
        await asyncio.sleep(0.05)  # the late result is delivered to a cancelled future: ignored

    asyncio.run(scenario())
