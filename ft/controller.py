"""The FT controller: one process beside the serving engine's, watching every TP worker and answering `/ft/status`.

It receives heartbeats (ZMQ PULL), declares workers suspect or dead by silence (the heartbeat timeout, sooner when a
peer is blocked on a silent one) or at once when a worker's process exits, refuses messages of an older epoch,
orders regroups, asks the launcher to restart dead workers (automatically, or on an operator's rejoin) and plans
them back in once they beat as joining, and serves status (`controller_state.py`) and the operator's requests
(`admin_requests.py`: fault injection, drain, rejoin) to the HTTP server over a REP socket; with metrics on, its
state also shows as Prometheus metrics (`metrics.py`). The launcher starts it with its options (`options.py`) by
`spawn_controller`; it exits when the launcher does.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import msgspec
import zmq

from ft.admin_requests import ADMIN_OPS
from ft.controller_state import ControllerState, PendingRecovery, recovery_record
from ft.events import EventLog
from ft.failure_detector import HEARTBEAT_TIMEOUT, FailureDetector, Transition
from ft.heartbeat import MessageReceiver
from ft.kv_store_keeper import KvStoreKeeper
from ft.membership import Membership, WorkerState
from ft.messages import (
    BackupResync,
    ControlRequest,
    Fenced,
    GroupLost,
    Heartbeat,
    LateStageDone,
    Regroup,
    RegroupDone,
    Respawn,
    WorkerFailed,
    decode_control,
    encode,
)
from ft.metrics import ft_metrics
from ft.model_config import model_shape_from_dir
from ft.options import CONTROLLER_OPTIONS_ENV, ControllerOptions
from ft.partition import ModelShape, TPLayout
from ft.process_watch import ProcessWatch
from ft.ports import free_port
from ft.respawn import Respawner, RespawnPolicy
from ft.sockets import bind_socket, process_keys, use_secret_file
from ft.wire import Dropped

logger = logging.getLogger("sglang_ft.controller")


class FtController:
    def __init__(self, heartbeat_endpoint: str, control_endpoint: str, tp_size: int, interval_s: float,
                 timeout_s: float, parent_pid: int, enable_fault_injection: bool,
                 order_endpoint: str | None = None, shape: ModelShape | None = None,
                 respawn: RespawnPolicy = RespawnPolicy(), local_workers: range | None = None,
                 dp_rank: int | None = None, hybrid: bool = False):
        membership = Membership.initial(tp_size)
        self.state = ControllerState(membership, FailureDetector(membership, interval_s, timeout_s))
        self.receiver = MessageReceiver(heartbeat_endpoint)
        self.control = bind_socket(zmq.REP, control_endpoint, process_keys())
        self.orders = None
        if order_endpoint is not None:
            self.orders = bind_socket(zmq.PUB, order_endpoint, process_keys())
        self.hybrid = hybrid  # layouts split off the remainder KV heads (hybrid attention, cyclic placement)
        self.layout = TPLayout.even(shape, tp_size, self.hybrid) if shape is not None else None
        self.pending: PendingRecovery | None = None
        self.lost: GroupLost | None = None  # no worker left that holds the model (re-published while so)
        self.lost_published = 0.0
        self.failure_reported_at: float | None = None  # a worker saw a collective fail in the current epoch
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.parent_pid = parent_pid
        self.enable_fault_injection = enable_fault_injection
        self.respawner = Respawner(respawn)
        self.ready_joiners: set[int] = set()
        self.kv_slots = 0  # every member's KV pool size, from heartbeats; a restarted worker needs the same
        self.metrics = ft_metrics(dp_rank)  # None unless SGLang's metrics are on
        self.exits = ProcessWatch()  # wakes the loop the moment a worker's process exits
        # the workers on this node (all, on one node): only their pids mean anything here; the others' deaths are
        # seen by heartbeat timeout and by the survivors' reports
        self.local_workers = range(tp_size) if local_workers is None else local_workers
        self.dropped = Dropped(logger, "sglang-ft controller")  # control requests and reports it could not use
        self.events = EventLog(dp_rank)  # fault events, polled by the HTTP server (GET /ft/events)

    def run(self) -> None:
        logger.info("sglang-ft controller: watching %d workers", len(self.state.membership.members()))
        while not self.exits.gone(self.parent_pid):  # a zombie launcher (killed, not yet reaped) is gone too
            self.step()

    def _silent_node_mates(self, changes: list[Transition], now: float) -> list[Transition]:
        """A worker on another node timed out: its node-mates that also missed beats went with it (a whole node
        lost, or cut off). Declared dead now, they leave in the same regroup instead of one regroup each."""
        per_node = len(self.local_workers)
        lost_nodes = {c.worker // per_node for c in changes
                      if c.state is WorkerState.DEAD and c.worker not in self.local_workers}
        mates = [w for w in self.state.membership.live_members()
                 if w // per_node in lost_nodes and self.state.membership.workers[w].state is WorkerState.SUSPECT]
        return [change for w in mates if (change := self.state.detector.declare_dead(w, now))]

    def _live_local(self) -> list[int]:
        return [w for w in self.state.membership.live_members() if w in self.local_workers]

    def step(self) -> None:
        watched = [self.state.membership.workers[w].pid for w in self._live_local()]
        for message in self.receiver.poll(self.interval_s / 2, self.exits.fds(watched)):
            self.handle_report(message, time.monotonic())
        now = time.monotonic()
        changes = self.state.detector.sweep(now, confirm_hangs=self.pending is None)
        for change in changes + self._silent_node_mates(changes, now):
            self._record(change, change.cause or HEARTBEAT_TIMEOUT)
        for worker in self._live_local():
            pid = self.state.membership.workers[worker].pid
            if self.exits.gone(pid):
                change = self.state.detector.declare_dead(worker, now)
                if change:
                    self._record(change, "process exit")
        self._watch_joiners(now)
        if self.state.kv_backup is not None and self.state.kv_backup.check():
            self._publish(BackupResync(self.state.membership.epoch, self.state.kv_backup.process.pid))
        if self.state.kv_backup is not None:
            self.events.follow_backup(self.state.kv_backup.events, self.state.membership.epoch)
        reported = self.failure_reported_at
        if reported is not None and now - reported > self.timeout_s + 0.5:
            # a collective failed, or a regroup failed on its members, and every worker is alive (e.g. a timeout
            # under load): order the same group again (joiners of a failed regroup stay joiners)
            cause = "collective failure with every worker alive" if self.pending is None else \
                f"regroup to epoch {self.pending.order.epoch} failed with every worker alive"
            self.start_recovery(cause, (now - reported) * 1e3)
        if self.pending is None and self.ready_joiners:
            joiners = tuple(sorted(self.ready_joiners))
            self.start_recovery(f"rejoin of worker{'s' if len(joiners) > 1 else ''} "
                                 f"{', '.join(map(str, joiners))}", 0.0, joiners)
        if self.lost is not None and now - self.lost_published > 1.0:
            self._publish(self.lost)  # the tokenizer's journal moves this group's requests elsewhere
        if self.pending is not None and now - self.pending.last_sent > 0.5:
            self._publish(self.pending.order)  # late or reconnecting subscribers still get it
        if self.metrics is not None:  # before answering: what /ft/status shows, /metrics shows too
            self.metrics.observe(self.state)
        self._serve_control(now)

    def handle_report(self, message, now: float) -> None:
        """One decoded report, whatever it holds: one whose handling raises is counted and dropped, and the loop
        goes on."""
        try:
            self._on_message(message, now)
        except Exception as exc:
            self.dropped.raised(exc)

    def _on_message(self, message, now: float) -> None:
        membership = self.state.membership
        if isinstance(message, Heartbeat) and message.joining and message.worker not in membership.members():
            self._on_joiner_beat(message, now)
            return
        if message.worker not in membership.members() or message.epoch > membership.epoch:
            # a worker outside the group (e.g. a hung one resumed after it was replaced) is fenced
            self.state.fenced_messages += 1
            self._publish(Fenced(message.worker, membership.epoch, message.pid))
            return
        if isinstance(message, RegroupDone):
            self._on_regroup_done(message, now)
        elif isinstance(message, LateStageDone):
            self._on_late_stage(message)
        elif isinstance(message, Heartbeat) and self.pending and message.worker in self.pending.still_joining():
            record = membership.workers[message.worker]  # joining until its first regroup completes
            record.pid, record.last_beat = message.pid, now
        elif isinstance(message, Heartbeat):
            if message.kv_backup is not None:
                self.state.kv_senders[message.worker] = message
            if message.load is not None:
                self.state.loads[message.worker] = message.load
            self.kv_slots = max(self.kv_slots, message.kv_slots)
            change = self.state.detector.beat(message.worker, message.pid, now, message.serving,
                                              message.step_running_s)
            if change and change.state is WorkerState.HEALTHY and self.state.detections:
                self._record(change, "heartbeats resumed")
        elif isinstance(message, WorkerFailed):
            logger.warning("sglang-ft controller: worker %d reports %s", message.worker, message.reason)
            if message.epoch == membership.epoch and self.failure_reported_at is None:
                self.failure_reported_at = now

    def _publish(self, message) -> None:
        if self.orders is not None:
            self.orders.send(encode(message))
            if isinstance(message, Regroup) and self.pending is not None:
                self.pending.last_sent = time.monotonic()
            if isinstance(message, GroupLost):
                self.lost_published = time.monotonic()

    def start_recovery(self, cause: str, detect_ms: float, new_joiners: tuple[int, ...] = ()) -> None:
        """Order the live members (and ready joiners, last, so rank 0 stays with a member that holds the
        scheduler's state) to form a group; its members plan the migration from what each holds."""
        membership = self.state.membership
        if self.layout is None:
            return
        survivors = membership.live_members()
        # A joiner whose regroup was interrupted still holds nothing.
        joining = tuple(self.pending.still_joining()) if self.pending is not None else ()
        joining = tuple(w for w in joining if w in survivors) + tuple(w for w in new_joiners if w not in survivors)
        workers = tuple(w for w in survivors if w not in joining) + joining
        if self.pending is not None:  # a regroup under way is replaced by this one
            self.events.regroup_failed(self.pending.order.epoch, len(self.pending.order.workers), cause)
        if not workers or len(workers) == len(joining):
            if self.lost is None:
                self.events.emit("replica_lost", membership.epoch, cause=cause)
                logger.error("sglang-ft controller: no worker left alive that holds the model (%s)", cause)
                self.lost = GroupLost(membership.epoch, cause)
            self._publish(self.lost)
            return
        if workers[0] not in self.local_workers:
            # rank 0 takes the tokenizer's requests over IPC and hosts the rendezvous: both live on this node only
            logger.error("sglang-ft controller: no worker left alive on node 0, where the tokenizer runs: workers "
                         "%s on other nodes cannot serve alone", list(workers))
            self.events.regroup_failed(membership.epoch + 1, len(workers), f"no worker left alive on node 0 ({cause})")
            return
        epoch = membership.regroup(workers)
        for worker in new_joiners:
            self.ready_joiners.discard(worker)
            self.respawner.on_ready(worker)
            membership.workers[worker].last_beat = time.monotonic()  # watched like every member from now on
        pids = tuple(membership.workers[w].pid or 0 for w in workers)
        store = self.state.kv_backup
        order = Regroup(epoch, workers, free_port(), cause, joining, pids,
                        kv_store_alive=store is None or store.alive)
        self.pending = PendingRecovery(order, time.monotonic(), round(detect_ms, 1), set(workers))
        self.state.regrouping = epoch
        self.failure_reported_at = None
        logger.warning("sglang-ft controller: epoch %d: regroup %s -> workers %s%s", epoch, cause, list(workers),
                       f", joining {list(joining)}" if joining else "")
        self.events.emit("regroup_started", epoch, tp_size=len(workers), cause=cause, workers=list(workers),
                         joining=list(joining), detect_ms=round(detect_ms, 1))
        self._publish(order)

    def _on_regroup_done(self, done: RegroupDone, now: float) -> None:
        pending = self.pending
        if pending is None or done.epoch != pending.order.epoch:
            return
        pending.waiting.discard(done.worker)
        pending.done.append(done)
        if pending.waiting:
            return
        self.state.recoveries.append(recovery_record(pending, now))
        for worker in pending.order.joining:
            self.respawner.on_joined(worker)
            self.state.membership.set_state(worker, WorkerState.HEALTHY, now)
        layouts = {r.layout_json for r in pending.done if r.layout_json}
        if len(layouts) == 1:
            self.layout = _reported_layout(layouts.pop(), self.layout, len(pending.order.workers)) or self.layout
        logger.warning("sglang-ft controller: epoch %d recovered in %.1f ms", pending.order.epoch,
                       self.state.recoveries[-1]["recover_ms"])
        self.pending = None
        self.state.regrouping = None
        self.events.regroup_done(self.state.recoveries[-1])

    def _on_late_stage(self, done: LateStageDone) -> None:
        """A stage that ends after serving resumed (graph re-capture) joins its recovery's stages: the slowest
        worker's time, like every stage."""
        stages = next((r["stage_ms"] for r in reversed(self.state.recoveries) if r["epoch"] == done.epoch), None)
        if stages is None and self.pending is not None and self.pending.order.epoch == done.epoch:
            stages = self.pending.late_stage_ms
        if stages is not None:
            stages[done.stage] = max(stages.get(done.stage, 0.0), done.ms)

    def _record(self, change: Transition, cause: str) -> None:
        pid = self.state.membership.workers[change.worker].pid
        entry = {"worker": change.worker, "pid": pid, "state": change.state.value, "cause": cause,
                 "silent_ms": round(change.silent_s * 1e3, 1),
                 "at_s": round(time.monotonic() - self.state.started, 3)}
        self.state.detections.append(entry)
        self.events.transition(change.worker, change.state.value, cause, change.silent_s, self.state.membership)
        logger.warning("sglang-ft controller: worker %d (pid %s) is %s: %s", change.worker, pid, change.state.value,
                       cause)
        if change.state is WorkerState.DEAD:
            self.exits.forget(pid)  # a restarted worker is watched afresh under its new pid
            if self.metrics is not None:
                self.metrics.forget_process(pid)  # SGLang's gauges it wrote (observability/metrics_collector.py)
            self.respawner.on_dead(change.worker, time.monotonic())
            self.ready_joiners.discard(change.worker)
            if change.worker in self.state.membership.members():
                self.start_recovery(f"worker {change.worker}: {cause}", change.silent_s * 1e3)

    # --- restarting dead workers and planning them back in ---

    def _on_joiner_beat(self, beat: Heartbeat, now: float) -> None:
        """A restarted worker beats as joining: once it is initialised, plan it into the next group."""
        record = self.state.membership.workers.get(beat.worker)
        if record is None or record.state is not WorkerState.JOINING:
            self.state.fenced_messages += 1  # nobody restarted this worker: it is not ours to admit
            return
        record.pid, record.last_beat = beat.pid, now
        if beat.worker not in self.ready_joiners:
            logger.warning("sglang-ft controller: restarted worker %d (pid %d) is ready to rejoin", beat.worker,
                           beat.pid)
            self.ready_joiners.add(beat.worker)
            self.respawner.on_ready(beat.worker)

    def _watch_joiners(self, now: float) -> None:
        """Start the restarts that are due; a restarted worker that died or never became ready is dead again."""
        membership = self.state.membership
        for worker, record in membership.workers.items():
            if record.state is not WorkerState.JOINING or worker in membership.members():
                continue
            silent = record.last_beat is not None and now - record.last_beat > self.state.detector.startup_timeout_s
            if self.exits.gone(record.pid) or silent or worker in self.respawner.overdue(now):
                self.ready_joiners.discard(worker)
                membership.set_state(worker, WorkerState.DEAD, now)
                self._record(Transition(worker, WorkerState.DEAD, 0.0), "restart failed")
        startable = lambda w: (membership.workers[w].state is WorkerState.DEAD  # noqa: E731
                               and w not in membership.members() and self.kv_slots > 0)
        for worker in self.respawner.take_due(now, startable):
            record = membership.workers[worker]
            record.pid, record.last_beat = None, None
            membership.set_state(worker, WorkerState.JOINING, now)
            attempt = self.respawner.attempts[worker]
            self.state.respawns.append({"worker": worker, "attempt": attempt,
                                        "at_s": round(now - self.state.started, 3)})
            logger.warning("sglang-ft controller: restarting worker %d (attempt %d)", worker, attempt)
            self._publish(Respawn(worker, membership.epoch, self.kv_slots, attempt))

    def _serve_control(self, now: float) -> None:
        while True:
            try:
                frame = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.control.send(self.reply(frame, now))

    def reply(self, frame: bytes, now: float) -> bytes:
        """The answer to one control request, whatever it holds: the REP socket takes no next request before it has
        answered this one, so a request whose handling raises is answered too (500) and counted."""
        try:
            request = decode_control(frame)
            if request is None:
                self.dropped.refused("not a control request")
            return msgspec.json.encode(self._answer(request, now))
        except Exception as exc:
            self.dropped.raised(exc)
            return msgspec.json.encode({"error": f"the FT controller failed on this request: {type(exc).__name__}",
                                        "code": 500})

    def _answer(self, request: ControlRequest | None, now: float) -> dict:
        if request is None:
            return {"error": "malformed control request", "code": 400}
        if request.op == "status":
            return {**self.state.status(now), "serving": self.lost is None,
                    "malformed_messages": self.receiver.dropped + self.dropped.malformed}
        if request.op == "events":
            membership = self.state.membership
            return self.events.answer(request.after, len(membership.members()), len(membership.workers),
                                      len(membership.live_members()), self.state.regrouping)
        if request.op in ADMIN_OPS:
            return ADMIN_OPS[request.op](self, request, now)
        return {"error": f"unknown op {request.op!r}", "code": 400}

def _reported_layout(text: str, planned: TPLayout | None, ranks: int) -> TPLayout | None:
    """The layout the members report they formed, if it is one for this model with a shard per rank; else None."""
    try:
        layout = TPLayout.from_json(text)
    except Exception:  # whatever a forged or garbled text makes json or the dataclasses raise
        return None
    return layout if planned is not None and layout.shape == planned.shape and len(layout.shards) == ranks else None


def run_ft_controller(options: ControllerOptions, parent_pid: int) -> None:
    """Process entry point (started by the launcher with `spawn_controller`)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s FT] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    use_secret_file(options.secret_file)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server: clean up below, then exit
    tp_size = options.tp_size
    controller = FtController(options.heartbeat_endpoint, options.control_endpoint, tp_size,
                              options.heartbeat_interval_s, options.heartbeat_timeout_s, parent_pid,
                              options.enable_fault_injection, options.order_endpoint,
                              model_shape_from_dir(options.model_path),
                              RespawnPolicy(automatic=options.respawn, delay_s=options.respawn_delay_s),
                              range(tp_size // options.nnodes), dp_rank=options.dp_rank, hybrid=options.hybrid)
    controller.state.weight_cache_dir = options.weight_cache_dir
    if options.kv_backup:
        controller.state.kv_backup = KvStoreKeeper(options.kv_backup_endpoint, options.kv_fetch_endpoint,
                                                   options.respawn, options.secret_file)
    try:
        controller.run()
    finally:
        if controller.state.kv_backup is not None:
            controller.state.kv_backup.stop()
        shutil.rmtree(options.runtime_dir, ignore_errors=True)  # the launcher is gone: nothing will use the sockets


def spawn_controller(options: ControllerOptions, parent_pid: int) -> subprocess.Popen:
    """Start a controller process that exits when `parent_pid` does.

    A plain child process, not multiprocessing's spawn: spawn would re-import the parent's __main__ (SGLang's
    launcher: seconds of CPU) in a process that needs only zmq and msgspec."""
    return subprocess.Popen([sys.executable, "-m", "ft.controller", str(parent_pid)],
                            env=dict(os.environ, **{CONTROLLER_OPTIONS_ENV: options.to_json()}))


if __name__ == "__main__":
    run_ft_controller(ControllerOptions.from_json(os.environ[CONTROLLER_OPTIONS_ENV]), int(sys.argv[1]))
