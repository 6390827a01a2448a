"""The operator's requests to the FT controller: drain a worker, restart one that died (rejoin), inject a fault.

Each is refused (403) unless the server was started with `--ft-enable-fault-injection`, and answers 400/409 with the
reason when the request does not fit the group's state; they act through the controller's own recovery path (each
takes the `FtController` as its first argument; not imported here, which would make an import cycle).
"""

from __future__ import annotations

import logging
import os

from ft.faults import FAULT_KINDS, FAULT_SIGNALS
from ft.membership import WorkerState
from ft.messages import ControlRequest

logger = logging.getLogger("sglang_ft.controller")


def drain(controller, request: ControlRequest, now: float) -> dict:
    """Take a healthy worker out of the group on purpose (maintenance): the others regroup without it, as after
    a failure but with no detection delay, and it exits when it sees the order. It stays out until a rejoin."""
    if not controller.enable_fault_injection:
        return {"error": "drain is an admin operation; start the server with --ft-enable-fault-injection",
                "code": 403}
    membership = controller.state.membership
    record = membership.workers.get(request.worker)
    if record is None:
        return {"error": f"worker must be one of {sorted(membership.workers)}, got {request.worker}", "code": 400}
    if request.worker not in membership.live_members() or record.state is not WorkerState.HEALTHY:
        return {"error": f"worker {request.worker} is not a healthy member ({record.state.value})", "code": 409}
    if len(membership.live_members()) < 2:
        return {"error": "the last worker of the group cannot be drained", "code": 409}
    if controller.pending is not None:
        return {"error": f"a regroup (epoch {controller.pending.order.epoch}) is under way; try again", "code": 409}
    controller.events.emit("worker_drained", membership.epoch, worker=request.worker,
                     rank=membership.members().index(request.worker), cause="drained")
    membership.set_state(request.worker, WorkerState.DEAD, now)
    controller.exits.forget(record.pid)
    controller.state.detections.append({"worker": request.worker, "pid": record.pid, "state": "dead",
                                  "cause": "drained", "silent_ms": 0.0,
                                  "at_s": round(now - controller.state.started, 3)})
    controller.start_recovery(f"drain of worker {request.worker}", 0.0)
    return {"draining": request.worker}

def rejoin(controller, request: ControlRequest, now: float) -> dict:
    if not controller.enable_fault_injection:
        return {"error": "rejoin is an admin operation; start the server with --ft-enable-fault-injection",
                "code": 403}
    record = controller.state.membership.workers.get(request.worker)
    if record is None:
        return {"error": f"worker must be one of {sorted(controller.state.membership.workers)}, got {request.worker}",
                "code": 400}
    if record.state is not WorkerState.DEAD or request.worker in controller.state.membership.members():
        return {"error": f"worker {request.worker} is {record.state.value}, not dead: nothing to rejoin",
                "code": 409}
    if not controller.respawner.request(request.worker, now):
        return {"error": f"worker {request.worker} is already being restarted", "code": 409}
    return {"rejoining": request.worker}

def inject(controller, request: ControlRequest, _now: float) -> dict:
    if not controller.enable_fault_injection:
        return {"error": "fault injection is disabled; start the server with --ft-enable-fault-injection",
                "code": 403}
    group = controller.state.membership.members()
    if not 0 <= request.rank < len(group):
        return {"error": f"rank must be in [0, {len(group)}), got {request.rank}", "code": 400}
    if request.kind not in FAULT_KINDS:
        return {"error": f"kind must be one of {sorted(FAULT_KINDS)}, got {request.kind!r}", "code": 400}
    worker = group[request.rank]
    if worker not in controller.local_workers:
        return {"error": f"rank {request.rank} (worker {worker}) runs on another node: fault injection signals "
                         "processes of the controller's node only", "code": 409}
    pid = controller.state.membership.workers[worker].pid
    if pid is None:
        return {"error": f"rank {request.rank} has not registered a pid yet", "code": 409}
    os.kill(pid, FAULT_SIGNALS[request.kind])
    logger.warning("sglang-ft controller: injected %s into rank %d (pid %d)", request.kind, request.rank, pid)
    return {"injected": request.kind, "rank": request.rank, "worker": worker, "pid": pid}


ADMIN_OPS = {"drain": drain, "rejoin": rejoin, "inject": inject}
