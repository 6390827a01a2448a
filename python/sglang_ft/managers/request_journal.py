"""The tokenizer manager's request journal: what was sent to the TP group and not finished yet.

Requests that reached a scheduler rank 0 that then died, before it shared them with the other ranks, exist
nowhere else. When the controller elects a new rank 0, the journal re-sends every unfinished request; the
schedulers drop the ones they already hold (by rid), so each request runs exactly once.

After the re-sends it tells the new rank 0 how many output tokens it has received per unfinished request
(`output_rewind.ReceivedTokens`): the old rank 0 may have died with a step's output unsent.

Before re-sending it replaces the tokenizer manager's socket to the schedulers with a fresh one at the same
endpoint. The old rank 0 may be hung rather than dead: its connection then stays open, the kernel keeps accepting
bytes for it, and ZMQ's PUSH would go on sending it every other request, which would be lost when it finally
exits. Closing the socket drops every old connection; the new rank 0 (re)connects to the fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import zmq

from ft.messages import Regroup, decode
from sglang_ft.managers.output_rewind import ReceivedTokens

logger = logging.getLogger(__name__)
PRUNE_EVERY = 64
SETTLE_S = 0.05  # lets outputs the detokenizer already forwarded land before counting what was received


class RequestJournal:
    def __init__(self):
        self.sent: dict[str, object] = {}
        self.tokenizer_manager = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._since_prune = 0
        self.resent_total = 0

    def record(self, tokenizer_manager, obj) -> None:
        """Called on the tokenizer manager's event loop for every dispatch to the scheduler."""
        self.tokenizer_manager = tokenizer_manager
        if self.loop is None:
            self.loop = asyncio.get_event_loop()
        for item in getattr(obj, "batch", None) or [obj]:
            rid = getattr(item, "rid", None)
            if isinstance(rid, str):
                self.sent[rid] = item
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self.prune()

    def prune(self) -> None:
        live = self.tokenizer_manager.rid_to_state if self.tokenizer_manager is not None else {}
        self.sent = {rid: obj for rid, obj in self.sent.items() if rid in live and not live[rid].finished}
        self._since_prune = 0

    def resend_unfinished(self) -> int:
        """Re-send every unfinished request (run on the tokenizer manager's event loop)."""
        self.prune()
        for obj in self.sent.values():
            self.tokenizer_manager._dispatch_to_scheduler(obj)
        self.resent_total += len(self.sent)
        logger.warning("sglang-ft: re-sent %d unfinished requests to the new TP rank 0", len(self.sent))
        return len(self.sent)

    def received_tokens(self, epoch: int) -> ReceivedTokens:
        """How many output tokens the tokenizer manager holds for every unfinished request sent."""
        states = self.tokenizer_manager.rid_to_state
        return ReceivedTokens(epoch, {rid: len(states[rid].output_ids) for rid in self.sent if rid in states})

    async def resend_and_count(self, epoch: int) -> int:
        await asyncio.sleep(SETTLE_S)
        resent = self.resend_unfinished()
        from sglang.srt.managers.io_struct import wrap_as_pickle

        self.tokenizer_manager._dispatch_to_scheduler(wrap_as_pickle(self.received_tokens(epoch)))
        return resent

    async def switch_rank0(self, epoch: int = 0) -> int:
        """A new rank 0 was elected: a fresh socket to the schedulers, then every unfinished request re-sent on it
        and the output counts (sends wait in it until the new rank 0 has connected). Runs on the tokenizer
        manager's event loop."""
        manager = self.tokenizer_manager
        if getattr(manager, "tokenizer_ipc_name", None) is not None:  # several tokenizers: theirs is a connect
            return await self.resend_and_count(epoch)
        old = manager.send_to_scheduler
        endpoint = old.getsockopt(zmq.LAST_ENDPOINT).decode()
        fresh = old.context.socket(zmq.PUSH)
        for option in (zmq.SNDHWM, zmq.SNDBUF):
            fresh.setsockopt(option, old.getsockopt(option))
        manager.send_to_scheduler = fresh  # from here on nothing is queued for the old rank 0
        old.close(linger=0)
        resent = await self.resend_and_count(epoch)
        await bind_when_free(fresh, endpoint)
        logger.warning("sglang-ft: the tokenizer manager's socket to the new TP rank 0 is open at %s", endpoint)
        return resent

    def follow_orders(self, endpoint: str) -> None:
        """Watch the controller's orders; re-send when a regroup elects a different rank 0."""
        threading.Thread(target=self._follow, args=(endpoint,), name="ft-journal", daemon=True).start()

    def _follow(self, endpoint: str) -> None:
        socket = zmq.Context.instance().socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(endpoint)
        leader, epoch = 0, 0
        while True:
            order = decode(socket.recv())
            if not isinstance(order, Regroup) or order.epoch <= epoch:
                continue
            epoch = order.epoch
            if order.workers[0] != leader and self.loop is not None:
                self.loop.call_soon_threadsafe(lambda e=epoch: self.loop.create_task(self.switch_rank0(e)))
            leader = order.workers[0]


async def bind_when_free(socket, endpoint: str, timeout_s: float = 2.0) -> None:
    """Bind `socket` where a just-closed socket was bound. A TCP port is free only once ZMQ closed the old socket in
    the background, so EADDRINUSE is retried. An ipc path needs no wait: libzmq (4.3, what pyzmq >= 25 bundles)
    unlinks a leftover file when binding and never unlinks a named ipc file on close (waiting for that cost every
    rank-0 election 2 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.01)


JOURNAL = RequestJournal()
