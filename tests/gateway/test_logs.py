"""The gateway's log handler follows stderr as it is when a line is logged."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from gateway.logs import configure_logging


def test_lines_go_to_the_current_stderr_even_after_the_first_one_was_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    first, second = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("text", "info")
        logging.getLogger("peft_gateway.test").info("one")
        first.close()  # what a test runner's capture does while server threads still log
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("peft_gateway.test").info("two")
        assert "Logging error" not in second.getvalue()
        assert second.getvalue().rstrip().endswith("peft_gateway.test: two")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
