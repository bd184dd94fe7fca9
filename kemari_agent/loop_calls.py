"""Calls other threads hand to a loop thread, run there between two of its steps.

The VMM's loop (with the vCPU stopped) and the secondary's receiver (between
two passes) each own one: a caller submits, wakes the loop, and waits for
the result or the exception fn() raised.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class LoopCalls:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()

    def call(self, fn: Callable[[], Any], wake: Callable[[], None], timeout: float) -> Any:
        """Any thread: fn() queued, the loop woken (wake()), and fn()'s result."""
        fut: Future = Future()
        self._queue.put((fn, fut))
        wake()
        return fut.result(timeout)

    def run_pending(self) -> None:
        """The loop thread: every call queued so far, in order."""
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                fut.set_exception(exc)
