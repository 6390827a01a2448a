"""sglang-ft inside one TP scheduler process: heartbeats, the controller's orders, and recovery from a failure.

`FtWorker.run_event_loop` wraps SGLang's scheduler loop. When a collective fails (a peer died, or timed out
because a peer hangs), the worker reports it, waits for the controller's `Regroup` order of a newer epoch, and
regroups in place (see `sglang_ft.managers.regroup`), then re-enters SGLang's loop. A worker that finds itself
outside the newest group (a hung process resumed after it was replaced) changes nothing and exits. A restarted
worker (`managers/joiner.py`) waits for the order that plans it back in before it enters SGLang's loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback

import zmq

from ft.heartbeat import HeartbeatSender
from ft.messages import BackupResync, Fenced, Regroup, WorkerFailed, decode_order, encode
from ft.sockets import connect_socket, process_keys
from ft.wire import Dropped
from sglang_ft.managers.output_rewind import FinishedRequests
from sglang_ft.managers.request_ledger import RequestLedger
from sglang_ft.managers.worker_load import probe_load
from sglang_ft.server_args import FtArgs

logger = logging.getLogger(__name__)
ORDER_WAIT_S = 120.0


class RegroupOrdered(Exception):
    """Raised at the top of a scheduler iteration when the controller ordered a newer group.

    A survivor that saw no failure itself (e.g. idle while a peer it was not talking to died) leaves SGLang's loop
    at this clean point and joins the regroup.
    """


def is_collective_failure(exc: BaseException) -> bool:
    """Is this a peer vanishing in a collective or a rendezvous (not a bug in a step)? By type only: the
    collectives raise `CollectiveFailure` (`collectives_may_fail`), a newer order `RegroupOrdered`."""
    from sglang_ft.distributed.collective_failure import CollectiveFailure
    from sglang_ft.distributed.regroup_groups import Superseded

    return isinstance(exc, (CollectiveFailure, RegroupOrdered, Superseded))


class OrderListener:
    """A thread holding the newest Regroup order; it exits the process when this worker is fenced out."""

    def __init__(self, endpoint: str, worker: int, current_epoch, before_newer_order=None, waiting_to_join=None):
        self.worker = worker
        self.current_epoch = current_epoch  # callable: this worker's epoch now
        self.waiting_to_join = waiting_to_join or (lambda: False)  # callable: a restarted worker not yet planned in
        self.before_newer_order = before_newer_order  # called (in this thread) before a newer order is handed on
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
            self._exit_fenced(message.epoch)
        if isinstance(message, BackupResync):
            self.resync_requested = True
        if not isinstance(message, Regroup):
            return
        if self.waiting_to_join() and self.worker not in message.workers:
            return  # a regroup of the others while this restarted worker is still starting up
        if message.epoch > self.current_epoch() and self.worker not in message.workers:
            self._exit_fenced(message.epoch)
        if (self.latest is None or message.epoch > self.latest.epoch) and self.before_newer_order:
            self.before_newer_order(message)
        with self._arrived:
            if self.latest is None or message.epoch > self.latest.epoch:
                self.latest = message
                self._arrived.notify_all()

    def _exit_fenced(self, epoch: int) -> None:
        logger.warning("sglang-ft: worker %d is fenced out by epoch %d (it was replaced); exiting without "
                       "touching anything", self.worker, epoch)
        os._exit(0)

    def wait_newer_than(self, epoch: int, timeout_s: float) -> Regroup | None:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while self.latest is None or self.latest.epoch <= epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
            return self.latest


class FtWorker:
    """The FT side of one scheduler: identity (worker id = launch TP rank), epoch, and the recovery loop."""

    def __init__(self, scheduler, ft: FtArgs, worker: int, port_args, joining: bool = False):
        self.scheduler = scheduler
        self.port_args = port_args
        self.ft = ft
        self.worker = worker
        self.joining = joining  # a restarted worker: no scheduler state until a regroup that includes it completes
        self.holds_weights = not joining  # a restarted worker's placeholder weights are not the model's
        self.regrouping = False  # inside a regroup (a joiner's first one included)
        self.epoch = -1 if joining else 0
        self.group: tuple[int, ...] = ()  # worker ids of the current group, in TP-rank order (set at start)
        self.ledger = RequestLedger()
        self.finished = FinishedRequests()  # for a re-send of output a dying rank 0 never sent (output_rewind.py)
        self.counts_wait = None  # ReceivedTokensWait while this new rank 0 waits for the tokenizer manager's counts
        self.dp_rank = 0  # this worker's data-parallel replica (under --dp-size)
        self.resumes: dict[str, object] = {}  # rid -> its ResumeTokens, for requests moved here (replica_move.py)
        self.die_before_next_send = False  # the "kill_unsent" fault is armed
        self.fail_next_step = False  # the "fail_step" fault is armed
        self.die_before_next_copy = False  # the "kill_uncopied" fault is armed
        self.last_step_s = 0.0  # the latest forward's time (SGLang's run_batch), for /ft/status
        self.last_step_collective_s: float | None = 0.0  # of which inside TP collectives (None where not measured)
        self.steps = 0
        self.busy_s_total = 0.0  # forward time outside TP collectives, summed over every step
        self.failed_batch = None  # the batch whose forward a failed collective interrupted (its KV is partial)
        self.kv_intact = True  # False while a regroup is rebuilding the KV pool
        self.kv_stream = None  # KvStreamer when --ft-kv-backup is on
        self.heartbeat = HeartbeatSender(ft.heartbeat_endpoint, worker, ft.heartbeat_interval_ms / 1e3, self.epoch)
        self.heartbeat.joining = joining
        self.heartbeat.load_probe = lambda: probe_load(self)
        self.heartbeat.start()
        self.orders = OrderListener(ft.order_endpoint, worker, lambda: self.epoch, self._interrupt_old_group,
                                    lambda: self.joining and not self.regrouping)
        self._reports = connect_socket(zmq.PUSH, ft.heartbeat_endpoint, process_keys(), linger_ms=1000)

    def _interrupt_old_group(self, order: Regroup) -> None:
        """A newer group is ordered: make a collective of the old group that is still waiting fail now."""
        from sglang_ft.distributed.standby_nccl import interrupt_for

        if order.epoch > self.epoch and (self.regrouping or not self.joining):
            aborted, shut = interrupt_for(order, self.group)  # NCCL: shrunk when a standby set fits
            logger.info("sglang-ft: worker %d: epoch %d ordered; aborted %d NCCL communicators and shut down %d "
                        "connections of the old group", self.worker, order.epoch, aborted, shut)

    @property
    def maps_requests(self) -> bool:
        """Under --dp-size with KV backup, TP rank 0 tells the store which slots hold each request, so another
        replica can take the requests over with their KV if this one loses every worker (replica_kv.py)."""
        return self.kv_stream is not None and self.ft.dp_size > 1 and bool(self.group) and self.group[0] == self.worker

    def start_kv_backup(self, runner, allocator) -> None:
        """Stream this rank's KV to the node's backup store from now on."""
        from sglang_ft.mem_cache.kv_backup_stream import KvStreamer

        model = runner.model
        self.kv_stream = KvStreamer(self.ft.kv_backup_endpoint, self.worker, self.ft.kv_backup_queue,
                                    runner.token_to_kv_pool, allocator, model.layout.shape.num_key_value_heads)
        self.kv_stream.follow(runner.token_to_kv_pool, model.shard.kv_heads, self.epoch)
        self.heartbeat.kv_backup_counters = self.kv_stream.counters

    def check_orders(self) -> None:
        """Called at the top of every scheduler iteration (no forward in flight, every allocated slot written):
        re-send the KV to a restarted backup store; leave the loop if a newer group was ordered."""
        if self.kv_stream is not None:
            self.kv_stream.pipeline.pump()  # hand over the KV copies that completed since the last step
        if self.orders.resync_requested:
            self.orders.resync_requested = False
            if self.kv_stream is not None:
                slots, sent = self.kv_stream.resync()
                placement = self.scheduler.tp_worker.model_runner.model.remainder
                if placement is not None:  # hybrid attention: the remainder rows this worker holds, too
                    sent += placement.resync()
                logger.info("sglang-ft: worker %d re-sent %d slots of KV to the restarted backup store (%d messages)",
                            self.worker, slots, sent)
        latest = self.orders.latest
        if latest is not None and latest.epoch > self.epoch:
            raise RegroupOrdered(f"the controller ordered epoch {latest.epoch}")

    def begin_iteration(self) -> None:
        """Top of a scheduler iteration, between steps: stamp its start for the heartbeat thread when there is work,
        so a survivor blocked in a collective on a hung peer says so in its beats (ft/failure_detector.py). Idle
        iterations are not stamped: an idle rank 0 may sleep (`--sleep-on-idle`) while the others wait on it."""
        scheduler = self.scheduler
        busy = not scheduler.running_batch.is_empty() or scheduler.waiting_queue or scheduler.chunked_req is not None
        self.heartbeat.step_started = time.monotonic() if busy else None

    def record_step(self, seconds: float, collective_s: float | None) -> None:
        """A forward completed: its time, and how much of it was spent inside TP collectives (for /ft/status)."""
        self.last_step_s, self.last_step_collective_s = seconds, collective_s
        self.steps += 1
        self.busy_s_total += seconds - (collective_s or 0.0)

    def report(self, message) -> None:
        self._reports.send(encode(message))

    def run_event_loop(self, original) -> None:
        """SGLang's loop, re-entered after every in-place recovery (entered by a restarted worker once it joined)."""
        if self.joining:
            logger.warning("sglang-ft: restarted worker %d is initialised; waiting to be planned back in",
                           self.worker)
            self._or_fail_stop(self._regroup_when_ordered, None)
        from sglang_ft.distributed.collective_failure import collectives_may_fail

        while True:
            try:
                with collectives_may_fail():
                    return original(self.scheduler)
            except Exception as exc:  # a failed collective is recovered; anything else stops this worker alone
                self.heartbeat.step_started = None  # out of the loop: no longer blocked on anyone
                if not is_collective_failure(exc):
                    self._fail_stop(exc)
                self._or_fail_stop(self.recover, exc)

    def _or_fail_stop(self, step, *args) -> None:
        try:
            step(*args)
        except Exception as exc:
            self._fail_stop(exc)

    def _fail_stop(self, exc: BaseException) -> None:
        """An unexpected error in this worker: exit like a crashed GPU, so the others regroup without it.

        Upstream SIGQUITs the launcher, which takes the whole server down; under `--ft` one worker's fault stays
        one worker's fault. The traceback is logged first, so the error is not lost.
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
        from sglang_ft.distributed.collective_failure import collectives_may_fail
        from sglang_ft.managers.regroup import regroup_in_place

        seen = self.epoch
        while True:
            wait = None if self.joining and not self.regrouping else ORDER_WAIT_S  # a joiner waits for its turn
            order = self.orders.wait_newer_than(seen, wait if wait is not None else 1e9)
            if order is None:
                raise RuntimeError(f"no regroup order from the FT controller within {ORDER_WAIT_S:.0f}s") from cause
            seen = order.epoch
            if self.worker not in order.workers:
                continue  # only a restarted worker still starting up gets here (others are fenced)
            self.regrouping = True
            try:
                with collectives_may_fail():
                    done = regroup_in_place(self, order)
            except Exception as again:  # another failure during the regroup: wait for the next order
                if not is_collective_failure(again):
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


_WORKER: FtWorker | None = None


def install_worker(worker: FtWorker) -> None:
    """One scheduler per process: hooks that run inside SGLang components find its FT worker here."""
    global _WORKER
    _WORKER = worker


def current_worker() -> FtWorker | None:
    return _WORKER
