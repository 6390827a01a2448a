"""The tokenizer manager's request journal: what was sent to the TP group and not finished yet.

Requests that reached a scheduler rank 0 that then died, before it shared them with the other ranks, exist
nowhere else. When the controller elects a new rank 0, the journal re-sends every unfinished request; the
schedulers drop the ones they already hold (by rid), so each request runs exactly once.

After the re-sends it tells the new rank 0 how many output tokens it has received per unfinished request
(`output_rewind.ReceivedTokens`): the old rank 0 may have died with a step's output unsent.

Under `--dp-size M` the journal also routes: every request gets its replica here (`replica_router.py`), a
re-send goes back to its own replica, and when a replica's controller reports its group lost, the journal gives
that replica's unfinished requests to the others, each with the output tokens its client already has
(`replica_move.ResumeTokens`), so it goes on from there.

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
from dataclasses import dataclass, field

import zmq

from ft.kv_backup import slots_of_requests
from ft.messages import GroupLost, Regroup, decode_order
from ft.sockets import connect_socket, process_keys
from ft.wire import Dropped
from sglang_ft.managers.io_struct import ReceivedTokens, RenewReplicaSocket, ResumeTokens
from sglang_ft.managers.push_socket import fresh_push_socket, try_bind
from sglang_ft.managers.tokenizer_manager_components.replica_router import ReplicaRouter
from sglang_ft.sglang_surface import dispatch_to_scheduler

logger = logging.getLogger(__name__)
PRUNE_EVERY = 64
SETTLE_S = 0.05  # lets outputs the detokenizer already forwarded land before counting what was received


@dataclass
class ReplicaOrders:
    """What the journal has seen of one replica's orders: the newest epoch, its rank 0, whether the group is lost."""

    replica: int
    leader: int = 0
    epoch: int = 0
    lost: bool = False
    dropped: Dropped = field(default_factory=lambda: Dropped(logger, "sglang-ft journal's orders"))


class RequestJournal:
    def __init__(self):
        self.sent: dict[str, object] = {}
        self.tokenizer_manager = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._since_prune = 0
        self.resent_total = 0
        self.router: ReplicaRouter | None = None  # under --dp-size: the replica of every request
        self.kv_stores: list[str | None] = []  # each replica's backup store (fetch endpoint), None without backup

    def record(self, tokenizer_manager, obj) -> None:
        """Called on the tokenizer manager's event loop for every dispatch to the scheduler."""
        self.tokenizer_manager = tokenizer_manager
        if self.loop is None:
            self.loop = asyncio.get_event_loop()
        for item in getattr(obj, "batch", None) or [obj]:
            rid = getattr(item, "rid", None)
            if isinstance(rid, str):
                if self.router is not None and hasattr(item, "routed_dp_rank"):
                    self._route(item)
                self.sent[rid] = item
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self.prune()

    def _route(self, item) -> None:
        ids = list(getattr(item, "input_ids", None) or ())
        max_new = getattr(getattr(item, "sampling_params", None), "max_new_tokens", None) or 0
        self.router.refresh(self.tokenizer_manager.rid_to_state)
        item.routed_dp_rank = self.router.route(item.rid, ids, len(ids) + max_new, item.routed_dp_rank)

    def routing_status(self) -> dict:
        return self.router.status() if self.router is not None else {}

    def prune(self) -> None:
        live = self.tokenizer_manager.rid_to_state if self.tokenizer_manager is not None else {}
        self.sent = {rid: obj for rid, obj in self.sent.items() if rid in live and not live[rid].finished}
        self._since_prune = 0

    def _unfinished_of(self, replica: int) -> dict[str, object]:
        """The unfinished requests sent to `replica` (all of them when there is one)."""
        if self.router is None:
            return self.sent
        return {rid: obj for rid, obj in self.sent.items() if self.router.replica_of(rid) == replica}

    def resend_unfinished(self, replica: int = 0) -> int:
        """Re-send every unfinished request of `replica` (run on the tokenizer manager's event loop)."""
        self.prune()
        unfinished = self._unfinished_of(replica)
        for obj in unfinished.values():
            dispatch_to_scheduler(self.tokenizer_manager, obj)
        self.resent_total += len(unfinished)
        logger.warning("sglang-ft: re-sent %d unfinished requests to the new TP rank 0%s", len(unfinished),
                       f" of replica {replica}" if self.router is not None else "")
        return len(unfinished)

    def received_tokens(self, epoch: int, replica: int = 0) -> ReceivedTokens:
        """How many output tokens the tokenizer manager holds for every unfinished request sent to `replica`."""
        states = self.tokenizer_manager.rid_to_state
        return ReceivedTokens(epoch, {rid: len(states[rid].output_ids) for rid in self._unfinished_of(replica)
                                      if rid in states}, replica)

    async def resend_and_count(self, epoch: int, replica: int = 0) -> int:
        await asyncio.sleep(SETTLE_S)
        resent = self.resend_unfinished(replica)
        from sglang_ft.sglang_surface import wrap_as_pickle

        dispatch_to_scheduler(self.tokenizer_manager, wrap_as_pickle(self.received_tokens(epoch, replica)))
        return resent

    async def move_lost_replica(self, replica: int) -> int:
        """`replica` lost its whole group: route around it and send each of its unfinished requests to another
        replica, preceded by the output tokens its client already has and, when the lost replica's backup store
        holds it, where its KV is there (the new replica takes that KV and prefills only the newest token;
        replica_kv.py). Runs on the tokenizer manager's event loop."""
        await asyncio.sleep(SETTLE_S)
        from sglang_ft.sglang_surface import ActiveRanksOutput, wrap_as_pickle

        self.prune()
        states = self.tokenizer_manager.rid_to_state
        self.router.refresh(states, force=True)
        moved = self.router.lose(replica)
        # SGLang's DP controller stops sending to it (replica_outbox.py), broadcasts included
        dispatch_to_scheduler(self.tokenizer_manager, ActiveRanksOutput(status=self.router.live_mask()))
        moving = {rid: target for rid, target in moved.items()
                  if self.sent.get(rid) is not None and rid in states and not states[rid].finished}
        # KV that existed: prompt and output but the newest token (its KV is the next step's, wherever it runs)
        with_kv = {rid: len(getattr(self.sent[rid], "input_ids", None) or ()) + len(states[rid].output_ids) - 1
                   for rid in moving}
        store = self.kv_stores[replica] if replica < len(self.kv_stores) else None
        # the store's answer is a blocking round trip: off the loop
        kv_slots = await asyncio.get_running_loop().run_in_executor(
            None, slots_of_requests, store, with_kv) if store and moving else {}
        for rid, target in moving.items():
            obj, output_ids = self.sent[rid], list(states[rid].output_ids)
            obj.routed_dp_rank = target
            slots = kv_slots.get(rid, ())
            # the same socket to SGLang's DP controller, then the same socket to `target`: the tokens arrive first
            dispatch_to_scheduler(self.tokenizer_manager, wrap_as_pickle(ResumeTokens(
                rid, output_ids, target, store if len(slots) else None, [int(s) for s in slots])))
            dispatch_to_scheduler(self.tokenizer_manager, obj)
            self.router.tokens_taken_over += len(slots)
            self.router.tokens_recomputed += max(0, with_kv[rid] - len(slots))
            self.router.moved_total += 1
        left = [r for r, live in enumerate(self.router.live_mask()) if live]
        if left:
            logger.warning("sglang-ft: replica %d lost its group; %d unfinished requests moved to replicas %s (KV "
                           "of %d tokens from its backup store)", replica, len(moving), left,
                           sum(len(s) for s in kv_slots.values()))
        else:
            logger.error("sglang-ft: replica %d lost its group and no replica is left to serve", replica)
        return len(moving)

    async def switch_rank0(self, epoch: int = 0, replica: int = 0) -> int:
        """A new rank 0 was elected: a fresh socket to the schedulers, then every unfinished request re-sent on it
        and the output counts (sends wait in it until the new rank 0 has connected). Runs on the tokenizer
        manager's event loop. Under --dp-size the tokenizer manager's socket goes to SGLang's DP controller, which
        renews its socket to that replica instead, and only the requests of that replica are re-sent."""
        manager = self.tokenizer_manager
        if self.router is not None:  # the replica's socket is the DP controller's: it renews it (replica_outbox.py)
            from sglang_ft.sglang_surface import wrap_as_pickle

            dispatch_to_scheduler(manager, wrap_as_pickle(RenewReplicaSocket(replica)))
            return await self.resend_and_count(epoch, replica)
        if getattr(manager, "tokenizer_ipc_name", None) is not None:  # several tokenizers: theirs is a connect
            return await self.resend_and_count(epoch)
        fresh, endpoint = fresh_push_socket(manager.send_to_scheduler)
        manager.send_to_scheduler = fresh  # from here on nothing is queued for the old rank 0
        resent = await self.resend_and_count(epoch)
        await bind_when_free(fresh, endpoint)
        logger.warning("sglang-ft: the tokenizer manager's socket to the new TP rank 0 is open at %s", endpoint)
        return resent

    def follow_orders(self, endpoints: list[str], routing: str = "prefix_load",
                      kv_stores: list[str | None] | None = None) -> None:
        """Watch every replica's controller's orders: re-send when a regroup elects a different rank 0, move the
        requests of a replica whose group is lost (with their KV from its backup store, `kv_stores[replica]`)."""
        self.kv_stores = list(kv_stores or [])
        if len(endpoints) > 1:
            self.router = ReplicaRouter(len(endpoints), routing)
        for replica, endpoint in enumerate(endpoints):
            threading.Thread(target=self._follow, args=(endpoint, replica), name=f"ft-journal-{replica}",
                             daemon=True).start()

    def _on_loop(self, coroutine_fn) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(coroutine_fn()))

    def _follow(self, endpoint: str, replica: int) -> None:
        socket = connect_socket(zmq.SUB, endpoint, process_keys())
        seen = ReplicaOrders(replica)
        while True:
            self.on_order(seen, socket.recv())

    def on_order(self, seen: ReplicaOrders, frame: bytes) -> None:
        """One frame of a replica's order stream: anything not an order is counted and dropped, and so is an order
        whose handling raises; the thread goes on either way."""
        order = decode_order(frame)
        if order is None:
            seen.dropped.refused("not an order")
            return
        try:
            if isinstance(order, GroupLost) and self.router is not None and not seen.lost:
                seen.lost = True
                self._on_loop(lambda: self.move_lost_replica(seen.replica))
            if not isinstance(order, Regroup) or order.epoch <= seen.epoch:
                return
            seen.epoch = order.epoch
            if order.workers[0] != seen.leader:  # (a Regroup names at least one worker: checked as it is decoded)
                self._on_loop(lambda e=order.epoch: self.switch_rank0(e, seen.replica))
            seen.leader = order.workers[0]
        except Exception as exc:
            seen.dropped.raised(exc)


async def bind_when_free(socket, endpoint: str, timeout_s: float = 2.0) -> None:
    """Bind `socket` where a just-closed socket was bound, retrying while the endpoint is taken (push_socket.py; an
    ipc path needs no wait: waiting for its file to go cost every rank-0 election 2 s)."""
    deadline = time.monotonic() + timeout_s
    while not try_bind(socket, endpoint):
        if time.monotonic() >= deadline:
            raise zmq.ZMQError(zmq.EADDRINUSE, f"{endpoint} still in use after {timeout_s} s")
        await asyncio.sleep(0.01)


JOURNAL = RequestJournal()
