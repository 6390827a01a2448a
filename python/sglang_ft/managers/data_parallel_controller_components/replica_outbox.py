"""SGLang's DataParallelController, kept moving while a replica has no rank 0.

The DP controller sends each replica's requests on a ZMQ PUSH socket that the replica's rank 0 connects to, and
broadcasts control messages (aborts, the journal's output counts) to every replica. A PUSH socket with no peer
blocks the sender: while a replica elects a new rank 0, or for good once it has lost every worker, the controller's
one loop would stop there and no replica would get anything. So under `--ft` each replica's socket is wrapped in an
outbox that never blocks: what cannot leave now waits in order and a flusher thread sends it once the new rank 0
has connected; a replica reported lost (SGLang's own `ActiveRanksOutput`, sent by the journal) is dropped from the
controller's active replicas, and what waits for it is discarded.

When a replica elects a new rank 0 the journal also has the outbox renew its socket (`RenewReplicaSocket`): the old
rank 0 may be hung rather than dead, its connection still open, and PUSH would hand it every other message. A
fresh socket bound at the same endpoint drops every old connection; the new rank 0 reconnects to it, and the
journal re-sends what the old one held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import zmq

from sglang_ft.managers.io_struct import RenewReplicaSocket
from sglang_ft.managers.push_socket import bind_blocking, fresh_push_socket
from sglang_ft.sglang_surface import refresh_active_replicas

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

    def renew(self) -> None:
        """A fresh socket at the same endpoint: every peer connected to the old one is dropped (a hung rank 0 with
        it); what waits here stays, for the new rank 0."""
        with self.lock:
            self.socket, endpoint = fresh_push_socket(self.socket)
            bind_blocking(self.socket, endpoint)
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


def renew_on_request(controller, message) -> bool:
    """SGLang's DP controller hands messages of no type it knows to `send_control_message`; the journal's
    `RenewReplicaSocket` is handled here instead (True), everything else goes on to SGLang."""
    if not isinstance(message, RenewReplicaSocket):
        return False
    outbox = controller.workers[message.dp_rank]
    if isinstance(outbox, ReplicaOutbox):
        outbox.renew()
        logger.warning("sglang-ft: replica %d has a new rank 0: its socket renewed, old connections dropped",
                       message.dp_rank)
    return True


def drop_inactive(controller) -> None:
    """After SGLang's `update_active_ranks`: route and broadcast only to the active replicas, and let nothing wait
    for the others."""
    refresh_active_replicas(controller)
    for i, outbox in enumerate(controller.workers):
        if isinstance(outbox, ReplicaOutbox) and not controller.status[i] and not outbox.closed:
            logger.warning("sglang-ft: replica %d is out of the DP controller's routing (%d messages dropped)", i,
                           outbox.discard())
