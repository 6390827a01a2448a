"""The FT runtime inside one worker, engine-agnostic: heartbeats, the controller's orders, fencing, and the loop that
waits for an order after a failure and regroups (as torchft's Manager is for a training loop).

The engine side gives it callbacks (`Engine`): how to regroup in place for an order, which exceptions are a peer
vanishing in a collective, how to make a collective of the old group that still waits fail at once, and its load
for the heartbeats. `FtAgent.run(serve)` runs the engine's loop and recovers it: a collective failure is reported,
the agent waits for the controller's `Regroup` of a newer epoch that includes it, calls `engine.regroup(order)` once
per order, reports the `RegroupDone` and runs the engine's loop again; any other error stops this worker alone.
A worker that finds itself outside the newest group (a hung process resumed after it was replaced) changes nothing
and exits. A restarted worker (`joining`) waits for the order that plans it back in before it serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, ContextManager

import zmq

from ft.heartbeat import HeartbeatSender
from ft.messages import BackupResync, Fenced, Regroup, RegroupDone, WorkerFailed, WorkerLoad, decode_order, encode
from ft.options import AgentOptions
from ft.sockets import connect_socket, process_keys
from ft.wire import Dropped

logger = logging.getLogger(__name__)


class RegroupOrdered(Exception):
    """Raised at the top of an engine iteration when the controller ordered a newer group.

    A survivor that saw no failure itself (e.g. idle while a peer it was not talking to died) leaves the engine's
    loop at this clean point and joins the regroup.
    """


def exit_fenced(worker: int, epoch: int) -> None:
    logger.warning("sglang-ft: worker %d is fenced out by epoch %d (it was replaced); exiting without "
                   "touching anything", worker, epoch)
    os._exit(0)


class OrderListener:
    """A thread holding the newest Regroup order; it exits the process when this worker is fenced out."""

    def __init__(self, endpoint: str, worker: int, current_epoch, before_newer_order=None, waiting_to_join=None,
                 on_fenced: Callable[[int, int], None] = exit_fenced):
        self.worker = worker
        self.current_epoch = current_epoch  # callable: this worker's epoch now
        self.waiting_to_join = waiting_to_join or (lambda: False)  # callable: a restarted worker not yet planned in
        self.before_newer_order = before_newer_order  # called (in this thread) before a newer order is handed on
        self.on_fenced = on_fenced  # (worker, epoch): by default exits the process
        self.latest: Regroup | None = None
        self.resync_requested = False  # the backup store was restarted: re-send the KV this worker holds
        self._arrived = threading.Condition()
        self.dropped = Dropped(logger, f"sglang-ft worker {worker}'s orders")
        self._socket = connect_socket(zmq.SUB, endpoint, process_keys())
        threading.Thread(target=self._run, name=f"ft-orders-{worker}", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.handle(self._socket.recv())

    def handle(self, frame: bytes) -> None:
        """One frame of the order stream: anything not an order is counted and dropped, and so is an order whose
        handling raises; the listener goes on either way."""
        message = decode_order(frame)
        if message is None:
            self.dropped.refused("not an order")
            return
        try:
            self._on_order(message)
        except Exception as exc:
            self.dropped.raised(exc)

    def _on_order(self, message) -> None:
        if (isinstance(message, Fenced) and message.worker == self.worker and message.pid in (0, os.getpid())
                and message.epoch > self.current_epoch()):
            self.on_fenced(self.worker, message.epoch)
            return
        if isinstance(message, BackupResync):
            self.resync_requested = True
        if not isinstance(message, Regroup):
            return
        if self.waiting_to_join() and self.worker not in message.workers:
            return  # a regroup of the others while this restarted worker is still starting up
        if message.epoch > self.current_epoch() and self.worker not in message.workers:
            self.on_fenced(self.worker, message.epoch)
            return
        if (self.latest is None or message.epoch > self.latest.epoch) and self.before_newer_order:
            self.before_newer_order(message)
        with self._arrived:
            if self.latest is None or message.epoch > self.latest.epoch:
                self.latest = message
                self._arrived.notify_all()

    def wait_newer_than(self, epoch: int, timeout_s: float) -> Regroup | None:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while self.latest is None or self.latest.epoch <= epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
            return self.latest


@dataclass(frozen=True)
class Engine:
    """What the agent needs from the engine side of one worker."""

    regroup: Callable[[Regroup], RegroupDone]  # form the ordered group in place; raises like a collective on failure
    is_collective_failure: Callable[[BaseException], bool]  # a peer vanished (recoverable), not a bug in a step
    interrupt: Callable[[Regroup], None] = lambda order: None  # make a collective of the old group fail now
    load: Callable[[], WorkerLoad | None] = lambda: None  # read from the heartbeat thread while the engine runs
    collectives_may_fail: Callable[[], ContextManager] = contextlib.nullcontext  # failures raise inside it


class FtAgent:
    """The FT side of one worker: identity (worker id = launch TP rank), epoch, heartbeats, orders, recovery."""

    def __init__(self, options: AgentOptions, engine: Engine, joining: bool = False, kv_slots: int = 0,
                 on_fenced: Callable[[int, int], None] = exit_fenced):
        self.options = options
        self.worker = options.worker
        self.engine = engine
        self.joining = joining  # a restarted worker: nothing to serve until a regroup that includes it completes
        self.regrouping = False  # inside a regroup (a joiner's first one included)
        self.epoch = -1 if joining else 0
        self.heartbeat = HeartbeatSender(options.heartbeat_endpoint, self.worker, options.heartbeat_interval_s,
                                         self.epoch)
        self.heartbeat.joining = joining
        self.heartbeat.kv_slots = kv_slots
        self.heartbeat.load_probe = engine.load
        self.heartbeat.start()
        self.orders = OrderListener(options.order_endpoint, self.worker, lambda: self.epoch, self._before_newer_order,
                                    lambda: self.joining and not self.regrouping, on_fenced)
        self._reports = connect_socket(zmq.PUSH, options.heartbeat_endpoint, process_keys(), linger_ms=1000)

    def _before_newer_order(self, order: Regroup) -> None:
        if order.epoch > self.epoch and (self.regrouping or not self.joining):
            self.engine.interrupt(order)

    # --- called by the engine between steps ---

    def check_orders(self) -> None:
        """Top of an engine iteration: leave the loop if a newer group was ordered."""
        latest = self.orders.latest
        if latest is not None and latest.epoch > self.epoch:
            raise RegroupOrdered(f"the controller ordered epoch {latest.epoch}")

    def newer_order_than(self, epoch: int) -> bool:
        """Whether the controller ordered a group newer than `epoch` (a regroup under way is then superseded)."""
        latest = self.orders.latest
        return latest is not None and latest.epoch > epoch

    def take_resync_request(self) -> bool:
        """Whether the backup store was restarted since the last call (the worker then re-sends the KV it holds)."""
        requested, self.orders.resync_requested = self.orders.resync_requested, False
        return requested

    def step_started(self, at: float | None) -> None:
        """Stamp the start of the iteration with work under way (None: idle), for the heartbeats: a worker blocked
        in a collective on a hung peer says so (ft/failure_detector.py)."""
        self.heartbeat.step_started = at

    def work_arrived(self) -> None:
        """Work arrived in an iteration that had none at its top: its start is stamped now (unless it was)."""
        if self.heartbeat.step_started is None:
            self.heartbeat.step_started = time.monotonic()

    def stepped(self) -> None:
        """A step completed: past startup, this worker is judged by the heartbeat timeout from now on."""
        self.heartbeat.serving = True

    def follow_kv_backup(self, counters: Callable[[], tuple]) -> None:
        """The KV backup sender's counters (sent, dropped, bytes, queued), reported in every heartbeat."""
        self.heartbeat.kv_backup_counters = counters

    def report(self, message) -> None:
        self._reports.send(encode(message))

    # --- the loop ---

    def run(self, serve: Callable[[], object]):
        """The engine's loop, re-entered after every in-place recovery (entered by a joiner once it joined)."""
        if self.joining:
            logger.warning("sglang-ft: restarted worker %d is initialised; waiting to be planned back in",
                           self.worker)
            self._or_fail_stop(self._regroup_when_ordered, None)
        while True:
            try:
                with self.engine.collectives_may_fail():
                    return serve()
            except Exception as exc:  # a failed collective is recovered; anything else stops this worker alone
                self.heartbeat.step_started = None  # out of the loop: no longer blocked on anyone
                if not self.engine.is_collective_failure(exc):
                    self.fail_stop(exc)
                self._or_fail_stop(self.recover, exc)

    def _or_fail_stop(self, step, *args) -> None:
        try:
            step(*args)
        except Exception as exc:
            self.fail_stop(exc)

    def fail_stop(self, exc: BaseException) -> None:
        """An unexpected error in this worker: exit like a crashed GPU, so the others regroup without it.

        One worker's fault stays one worker's fault (an engine's own handler might take the whole server down).
        The traceback is logged first, so the error is not lost.
        """
        logger.error("sglang-ft: worker %d hit an unexpected error and stops; the group regroups without it:\n%s",
                     self.worker, "".join(traceback.format_exception(exc)))
        self.report(WorkerFailed(self.worker, self.epoch, f"unexpected error: {exc!r}"[:200], os.getpid()))
        logging.shutdown()
        os._exit(1)

    def recover(self, exc: BaseException) -> None:
        origin = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc  # a CollectiveFailure's collective
        where = " <- ".join(f"{f.name}" for f in reversed(traceback.extract_tb(origin.__traceback__)[-4:]))
        logger.warning("sglang-ft: worker %d (epoch %d) saw a failed collective in %s: %s", self.worker, self.epoch,
                       where, str(exc).splitlines()[0][:200])
        self.report(WorkerFailed(self.worker, self.epoch, str(exc)[:200], os.getpid()))
        self._regroup_when_ordered(exc)

    def _regroup_when_ordered(self, cause: BaseException | None) -> None:
        """Wait for an order of a newer epoch that includes this worker and regroup; again if that fails."""
        seen = self.epoch
        while True:
            wait = self.options.order_wait_s
            if self.joining and not self.regrouping:
                wait = 1e9  # a joiner waits for its turn
            order = self.orders.wait_newer_than(seen, wait)
            if order is None:
                raise RuntimeError(f"no regroup order from the FT controller within {wait:.0f}s") from cause
            seen = order.epoch
            if self.worker not in order.workers:
                continue  # only a restarted worker still starting up gets here (others are fenced)
            self.regrouping = True
            try:
                with self.engine.collectives_may_fail():
                    done = self.engine.regroup(order)
            except Exception as again:  # another failure during the regroup: wait for the next order
                if not self.engine.is_collective_failure(again):
                    raise
                logger.warning("sglang-ft: regroup to epoch %d failed (%s); waiting for a newer order",
                               order.epoch, str(again).splitlines()[0][:200])
                self.epoch = max(self.epoch, order.epoch)
                # if nobody died, only this report makes the controller order the regroup again
                self.report(WorkerFailed(self.worker, order.epoch, f"regroup to epoch {order.epoch} failed: "
                                         f"{str(again).splitlines()[0]}"[:200], os.getpid()))
                continue
            self.regrouping = False
            self.joining = self.heartbeat.joining = False
            # a member that holds the model: judged by the heartbeat timeout now, not the startup bound (a joiner
            # hung right after its join waited out 10 s before, stalling the group: the 10-minute chaos soak)
            self.heartbeat.serving = True
            self.epoch = order.epoch
            self.heartbeat.epoch = order.epoch
            self.report(done)
            return
