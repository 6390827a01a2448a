"""Wake an idle rank 0 when the FT runtime needs it.

Under `--sleep-on-idle` (the CPU platform's default) SGLang's TP rank 0 sleeps in a zmq poll on its tokenizer
sockets between requests (up to `sglang_surface.IDLE_SLEEP_POLL_S`), while the other ranks wait for it in the
request broadcast. A regroup ordered meanwhile would wait for that poll to end. The FT worker registers one end of a
pipe in the poll and writes to it when a newer group is ordered; the scheduler drains it at every iteration's top.
"""

from __future__ import annotations

import os

import zmq

from sglang_ft.sglang_surface import idle_poller


class IdleWake:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.attached = False

    def attach(self, scheduler) -> None:
        """Make this scheduler's idle sleep (if it has one) end when `wake()` is called."""
        poller = idle_poller(scheduler)
        if poller is not None:
            poller.register(self._read, zmq.POLLIN)
            self.attached = True

    def wake(self) -> None:
        """End the current or next idle sleep (callable from any thread)."""
        try:
            os.write(self._write, b"w")
        except BlockingIOError:  # the pipe is full: a wake is pending already
            pass

    def drain(self) -> None:
        """Top of an iteration: forget the wakes delivered so far, so the next idle sleep sleeps."""
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
