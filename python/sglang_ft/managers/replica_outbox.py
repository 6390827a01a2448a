"""SGLang's DataParallelController, kept moving while a replica has no rank 0.

The DP controller sends each replica's requests on a ZMQ PUSH socket that the replica's rank 0 connects to, and
broadcasts control messages (aborts, the journal's output counts) to every replica. A PUSH socket with no peer
blocks the sender: while a replica elects a new rank 0, or for good once it has lost every worker, the controller's
one loop would stop there and no replica would get anything. So under `--ft` each replica's socket is wrapped in an
outbox that never blocks: what cannot leave now waits in order and a flusher thread sends it once the new rank 0
has connected; a replica reported lost (SGLang's own `ActiveRanksOutput`, sent by the journal) is dropped from the
controller's active replicas, and what waits for it is discarded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import zmq

logger = logging.getLogger(__name__)
FLUSH_EVERY_S = 0.005


class ReplicaOutbox:
    """A PUSH socket whose sends never block: messages queue here, in order, until the peer takes them."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.pending: deque = deque()
        self.lock = threading.Lock()
        self.closed = False

    def send(self, data, flags: int = 0, **kwargs) -> None:
        self._put(("send", data, kwargs))

    def send_pyobj(self, obj, flags: int = 0, **kwargs) -> None:
        self._put(("send_pyobj", obj, kwargs))

    def _put(self, message) -> None:
        with self.lock:
            if not self.closed:
                self.pending.append(message)
                self._flush()

    def _flush(self) -> None:
        while self.pending:
            method, payload, kwargs = self.pending[0]
            try:
                getattr(self.socket, method)(payload, flags=zmq.NOBLOCK, **kwargs)
            except zmq.Again:
                return
            self.pending.popleft()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def discard(self) -> int:
        """Drop what waits (its replica is gone) and everything sent from now on."""
        with self.lock:
            dropped = len(self.pending)
            self.pending.clear()
            self.closed = True
            return dropped

    def __getattr__(self, name):
        return getattr(self.socket, name)


def install(controller) -> None:
    """Wrap every replica's socket of SGLang's DP controller and start the flusher."""
    outboxes = []
    for i, socket in enumerate(controller.workers):
        if socket is not None and not isinstance(socket, ReplicaOutbox):
            controller.workers[i] = ReplicaOutbox(socket)
            outboxes.append(controller.workers[i])

    def flusher():
        while True:
            time.sleep(FLUSH_EVERY_S)
            for outbox in outboxes:
                if outbox.pending:
                    outbox.flush()

    threading.Thread(target=flusher, name="ft-replica-outbox", daemon=True).start()


def drop_inactive(controller) -> None:
    """After SGLang's `update_active_ranks`: route and broadcast only to the active replicas, and let nothing wait
    for the others."""
    controller._refresh_active_workers()
    for i, outbox in enumerate(controller.workers):
        if isinstance(outbox, ReplicaOutbox) and not controller.status[i] and not outbox.closed:
            logger.warning("sglang-ft: replica %d is out of the DP controller's routing (%d messages dropped)", i,
                           outbox.discard())
