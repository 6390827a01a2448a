"""Heartbeats over ZMQ: a sender thread in each worker, a receiver in the controller.

The sender runs in a thread of its own, so a long forward pass never delays a beat; a process that is killed
or stopped stops beating, which is what the controller's FailureDetector watches for.
"""

from __future__ import annotations

import os
import threading
import time

import zmq

from ft.messages import Heartbeat, Report, decode_report, encode
from ft.sockets import bind_socket, connect_socket, process_keys


class HeartbeatSender:
    """Beats `Heartbeat(worker, pid, epoch, seq)` to `endpoint` every `interval_s` from a daemon thread."""

    def __init__(self, endpoint: str, worker: int, interval_s: float, epoch: int = 0):
        self.kv_backup_counters = None  # callable returning (sent, dropped, bytes, queued), set once KV backup streams
        self.joining = False  # a restarted worker waiting to be planned back in
        self.kv_slots = 0
        self.serving = False  # set once the worker's scheduler has finished a batch
        self.load_probe = None  # callable returning a WorkerLoad (or None), set by the worker
        self.step_started: float | None = None  # monotonic start of the current iteration with work, set between steps
        self.endpoint = endpoint
        self.worker = worker
        self.interval_s = interval_s
        self.epoch = epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ft-heartbeat-{worker}", daemon=True)

    def start(self) -> "HeartbeatSender":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s)

    def _run(self) -> None:
        # a stalled controller must not make beats pile up
        socket = connect_socket(zmq.PUSH, self.endpoint, process_keys(), options={zmq.SNDHWM: 16})
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    counters = self.kv_backup_counters() if self.kv_backup_counters else None
                    beat = Heartbeat(self.worker, os.getpid(), self.epoch, seq, counters and counters[:3], self.joining,
                                     self.kv_slots, counters[3] if counters else 0, self.serving, self._load(),
                                     self._step_running_s())
                    socket.send(encode(beat), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                seq += 1
                self._stop.wait(self.interval_s)
        finally:
            socket.close()

    def _step_running_s(self) -> float:
        """How long the scheduler's current iteration has run, read from this thread: it may be blocked in a
        collective."""
        started = self.step_started  # one read: the scheduler may clear it meanwhile
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def _load(self):
        """The worker's load, read from this thread while the scheduler runs: a racing read is skipped, not fatal."""
        try:
            return self.load_probe() if self.load_probe else None
        except Exception:
            return None


class MessageReceiver:
    """The controller's PULL socket: every worker's heartbeats and failure reports arrive here."""

    def __init__(self, endpoint: str):
        self.socket = bind_socket(zmq.PULL, endpoint, process_keys())
        self.dropped = 0  # frames that were not valid reports (an order, a foreign or forged frame)

    def poll(self, timeout_s: float, wake_fds: list[int] = ()) -> list[Report]:
        """Every message that arrives within `timeout_s`; returns early once something arrived or one of
        `wake_fds` (e.g. a process-exit pidfd) became readable."""
        messages = []
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        for fd in wake_fds:
            poller.register(fd, zmq.POLLIN)
        if self.socket in dict(poller.poll(int(timeout_s * 1000))):
            while True:
                try:
                    frame = self.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                message = decode_report(frame)
                if message is None:
                    self.dropped += 1
                else:
                    messages.append(message)
        return messages

    def close(self) -> None:
        self.socket.close()
