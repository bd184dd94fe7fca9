"""A stop signal wakes the main loop's select() by itself (the C-level
handler writes to the loop's wake pipe), not only when Python gets round to
running the handler: a SIGTERM that lands just before select() otherwise
waits for the guest's next event, forever for an idle guest."""

from __future__ import annotations

import os
import select
import signal

import pytest

from kemari_agent.standalone import install_stop_handler, restore_handlers

pytestmark = pytest.mark.unit


def test_sigterm_writes_the_wake_pipe_even_when_the_handler_does_not():
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    requested = []
    previous = install_stop_handler(lambda: requested.append(True), w)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            os.kill(os.getpid(), signal.SIGTERM)      # pending until unblocked
            assert not select.select([r], [], [], 0)[0]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        # the handler itself never touches the pipe: the byte is the C handler's
        assert select.select([r], [], [], 5)[0], "SIGTERM did not wake the loop's pipe"
        assert os.read(r, 16) == bytes([signal.SIGTERM])
        assert requested == [True]
    finally:
        restore_handlers(previous)
        os.close(r)
        os.close(w)
    assert signal.set_wakeup_fd(-1) == -1, "restore_handlers left the wakeup fd set"
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]
