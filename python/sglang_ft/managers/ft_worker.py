"""sglang-ft inside one TP scheduler process: the SGLang side of the worker's FT agent (`ft/agent.py`).

The agent (heartbeats, the controller's orders, fencing, the wait-for-an-order loop) is engine-agnostic; `FtWorker`
gives it SGLang's side: the regroup in place (`sglang_ft.elastic_tp.regroup`), which exceptions are a peer lost in a
collective, the interrupt of the old group's communicators, the scheduler's load. It also keeps what the scheduler's
hooks need between steps (request ledger, finished outputs, KV backup stream, armed faults): the hooks and the
regroup call its methods, nothing outside sets its fields.
"""

from __future__ import annotations

import logging
import signal
import time

from ft.agent import Engine, FtAgent, RegroupOrdered
from ft.faults import ARMED_FAULTS, FAULT_SIGNALS
from ft.messages import Regroup, RegroupDone
from sglang_ft.managers.scheduler_components.idle_wake import IdleWake
from sglang_ft.managers.scheduler_components.output_rewind import FinishedRequests
from sglang_ft.elastic_tp.received_requests import RequestLedger
from sglang_ft.managers.scheduler_components.worker_load import probe_load
from sglang_ft.server_args import FtArgs

logger = logging.getLogger(__name__)


def is_collective_failure(exc: BaseException) -> bool:
    """Is this a peer vanishing in a collective or a rendezvous (not a bug in a step)? By type only: the
    collectives raise `CollectiveFailure` (`collectives_may_fail`), a newer order `RegroupOrdered`, a rendezvous
    `Superseded` or `StorePortTaken` (the order's store port held by another socket: ordered again elsewhere)."""
    from sglang_ft.distributed.collective_failure import CollectiveFailure
    from sglang_ft.elastic_tp.groups import StorePortTaken, Superseded

    return isinstance(exc, (CollectiveFailure, RegroupOrdered, Superseded, StorePortTaken))


def _collectives_may_fail():
    from sglang_ft.distributed.collective_failure import collectives_may_fail

    return collectives_may_fail()


class FtWorker:
    """The SGLang side of one scheduler's FT agent: identity (worker id = launch TP rank), what it holds, and the
    state the scheduler's hooks keep between steps."""

    def __init__(self, scheduler, ft: FtArgs, worker: int, port_args, joining: bool = False,
                 group: tuple[int, ...] = (), dp_rank: int = 0, kv_slots: int = 0):
        self.scheduler = scheduler
        self.port_args = port_args
        self.ft = ft
        self.worker = worker
        self.holds_weights = not joining  # a restarted worker's placeholder weights are not the model's
        self.group = tuple(group)  # worker ids of the current group, in TP-rank order (empty for a joiner)
        self.dp_rank = dp_rank  # this worker's data-parallel replica (under --dp-size)
        self.ledger = RequestLedger()
        self.finished = FinishedRequests()  # for a re-send of output a dying rank 0 never sent (output_rewind.py)
        self.counts_wait = None  # ReceivedTokensWait while this new rank 0 waits for the tokenizer manager's counts
        self.resumes: dict[str, object] = {}  # rid -> its ResumeTokens, for requests moved here (replica_move.py)
        self._armed: set[str] = set()  # faults (ft/faults.py ARMED_FAULTS) to act on at their point of the next step
        self.last_step_s = 0.0  # the latest forward's time (SGLang's run_batch), for /ft/status
        self.last_step_collective_s: float | None = 0.0  # of which inside TP collectives (None where not measured)
        self.steps = 0
        self.busy_s_total = 0.0  # forward time outside TP collectives, summed over every step
        self.failed_batch = None  # the batch whose forward a failed collective interrupted (its KV is partial)
        self.kv_intact = True  # False while a regroup is rebuilding the KV pool
        self.kv_stream = None  # KvStreamer when --ft-kv-backup is on
        engine = Engine(regroup=self._regroup, is_collective_failure=is_collective_failure,
                        interrupt=self._interrupt_old_group, load=lambda: probe_load(self),
                        collectives_may_fail=_collectives_may_fail)
        self.idle_wake = IdleWake()  # rank 0's idle sleep ends when a newer group is ordered
        self.agent = FtAgent(ft.agent_options(worker), engine, joining=joining, kv_slots=kv_slots)

    @property
    def epoch(self) -> int:
        return self.agent.epoch

    @property
    def joining(self) -> bool:
        return self.agent.joining

    @property
    def orders(self):
        """The agent's order listener (its `latest` order)."""
        return self.agent.orders

    def _regroup(self, order: Regroup) -> RegroupDone:
        from sglang_ft.elastic_tp.regroup import regroup_in_place

        return regroup_in_place(self, order)

    def _interrupt_old_group(self, order: Regroup) -> None:
        """A newer group is ordered: make a collective of the old group that is still waiting fail now, and end an
        idle rank 0's sleep."""
        self.idle_wake.wake()
        from sglang_ft.distributed.standby_groups import interrupt_for

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
        self.agent.follow_kv_backup(self.kv_stream.counters)

    # --- faults the controller arms by signal (ft/faults.py) ---

    def arm_faults_on_signals(self) -> None:
        """The faults this worker acts on itself arrive as signals from the controller: each arms its fault."""
        for kind in ARMED_FAULTS:
            signal.signal(FAULT_SIGNALS[kind], lambda *_, kind=kind: self.arm_fault(kind))

    def arm_fault(self, kind: str) -> None:
        if kind not in ARMED_FAULTS:
            raise ValueError(f"fault must be one of {ARMED_FAULTS}, got {kind!r}")
        self._armed.add(kind)

    @property
    def die_before_next_send(self) -> bool:
        """The "kill_unsent" fault is armed."""
        return "kill_unsent" in self._armed

    @property
    def die_before_next_copy(self) -> bool:
        """The "kill_uncopied" fault is armed."""
        return "kill_uncopied" in self._armed

    def injected_step_failure(self, batch) -> bool:
        """Whether the "fail_step" fault is armed: if so it is taken (disarmed) and `batch` counts as failed."""
        if "fail_step" not in self._armed:
            return False
        self._armed.discard("fail_step")
        self.failed_batch = batch
        return True

    # --- the scheduler's steps ---

    def check_orders(self) -> None:
        """Called at the top of every scheduler iteration (no forward in flight, every allocated slot written):
        re-send the KV to a restarted backup store; leave the loop if a newer group was ordered."""
        if self.idle_wake.attached:
            self.idle_wake.drain()
        if self.kv_stream is not None:
            self.kv_stream.pipeline.pump()  # hand over the KV copies that completed since the last step
        if self.agent.take_resync_request() and self.kv_stream is not None:
            slots, sent = self.kv_stream.resync()
            placement = self.scheduler.tp_worker.model_runner.model.remainder
            if placement is not None:  # hybrid attention: the remainder rows this worker holds, too
                sent += placement.resync()
            logger.info("sglang-ft: worker %d re-sent %d slots of KV to the restarted backup store (%d messages)",
                        self.worker, slots, sent)
        self.agent.check_orders()

    def begin_iteration(self) -> None:
        """Top of a scheduler iteration, between steps: stamp its start for the heartbeat thread when there is work,
        so a survivor blocked in a collective on a hung peer says so in its beats (ft/failure_detector.py). Idle
        iterations are not stamped: an idle rank 0 may sleep (`--sleep-on-idle`) while the others wait on it."""
        scheduler = self.scheduler
        busy = not scheduler.running_batch.is_empty() or scheduler.waiting_queue or scheduler.chunked_req is not None
        self.agent.step_started(time.monotonic() if busy else None)

    def batch_started(self) -> None:
        """A batch runs in an iteration that had no work at its top: its start is stamped from here."""
        self.agent.work_arrived()

    def step_failed(self, batch) -> None:
        """A failure interrupted `batch`'s forward: its tokens' KV is partial (park_requests.py)."""
        self.failed_batch = batch

    def record_step(self, seconds: float, collective_s: float | None) -> None:
        """A forward completed: its time, and how much of it was spent inside TP collectives (for /ft/status); from
        the first, the worker is judged by the heartbeat timeout."""
        self.last_step_s, self.last_step_collective_s = seconds, collective_s
        self.steps += 1
        self.busy_s_total += seconds - (collective_s or 0.0)
        self.agent.stepped()

    def counts_awaited(self) -> None:
        """The tokenizer manager's output counts arrived (or the wait ended): pull as usual from now on."""
        self.counts_wait = None

    def add_resumes(self, resumes) -> None:
        """ResumeTokens of requests moved here from a lost replica (replica_move.py), kept until they are adopted."""
        self.resumes.update((m.rid, m) for m in resumes)

    # --- the regroup's stages (elastic_tp/regroup.py) ---

    def expect_output_counts(self, wait) -> None:
        """This new rank 0 waits for the tokenizer manager's counts before its first step (output_rewind.py)."""
        self.counts_wait = wait

    def forget_failed_batch(self) -> None:
        self.failed_batch = None

    def start_kv_rebuild(self) -> bool:
        """The KV pool is being rebuilt; whether it was intact before (an interrupted rebuild leaves it untrusted)."""
        intact, self.kv_intact = self.kv_intact, False
        return intact

    def kv_rebuilt(self) -> None:
        self.kv_intact = True

    def holds_group(self, workers) -> None:
        """This worker's model is the new group's shard: what it holds matches `workers`, even if a later stage of
        the regroup fails and another follows."""
        self.holds_weights = True
        self.group = tuple(workers)

    def report(self, message) -> None:
        self.agent.report(message)

    def run_event_loop(self, original):
        """SGLang's loop, re-entered after every in-place recovery (entered by a restarted worker once it joined)."""
        return self.agent.run(lambda: original(self.scheduler))


_WORKER: FtWorker | None = None


def install_worker(worker: FtWorker) -> None:
    """One scheduler per process: hooks that run inside SGLang components find its FT worker here."""
    global _WORKER
    _WORKER = worker


def current_worker() -> FtWorker | None:
    return _WORKER
