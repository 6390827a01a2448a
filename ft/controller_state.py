"""What the FT controller knows and reports: membership, detections, recoveries, the KV senders' and workers' loads
(`/ft/status`), and a regroup under way until every member reports it done."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from ft.failure_detector import FailureDetector
from ft.membership import Membership
from ft.messages import Heartbeat, Regroup, RegroupDone, WorkerLoad
from ft.sockets import refused_connections
from ft.weight_cache import cache_status


@dataclass
class ControllerState:
    membership: Membership
    detector: FailureDetector
    started: float = field(default_factory=time.monotonic)
    detections: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)
    fenced_messages: int = 0
    kv_backup: object = None  # KvStoreKeeper when --ft-kv-backup is on
    kv_senders: dict[int, Heartbeat] = field(default_factory=dict)  # worker -> its latest beat with KV counters
    loads: dict[int, WorkerLoad] = field(default_factory=dict)  # worker -> its latest reported load
    respawns: list[dict] = field(default_factory=list)
    regrouping: int | None = None  # the epoch of the regroup under way
    weight_cache_dir: str = ""  # the node's copy of the checkpoint in host memory (ft/weight_cache.py), "" if off

    def status(self, now: float) -> dict:
        group = self.membership.members()
        workers = []
        for worker_id, record in sorted(self.membership.workers.items()):
            workers.append({
                "worker": worker_id,
                "rank": group.index(worker_id) if worker_id in group else None,
                "pid": record.pid,
                "state": record.state.value,
                "last_beat_ms_ago": None if record.last_beat is None else round((now - record.last_beat) * 1e3, 1),
                "max_beat_gap_ms": round(record.max_beat_gap_s * 1e3, 1),
                "step_running_ms": None if (step := self.detector.blocked_s(worker_id, now)) is None else
                round(step * 1e3, 1),
                "max_step_ms": round(record.max_step_s * 1e3, 1),
                **_kv_sender_fields(self.kv_senders.get(worker_id)),
                **_load_fields(self.loads.get(worker_id) if worker_id in group else None),
            })
        return {
            "epoch": self.membership.epoch,
            "tp_size": len(group),
            "live_workers": len(self.membership.live_members()),
            "workers": workers,
            "detections": self.detections,
            "recoveries": self.recoveries,
            "fenced_messages": self.fenced_messages,
            "kv_blocks_restored": sum(r["kv_blocks_restored"] for r in self.recoveries),
            "kv_tokens_recomputed": sum(r["kv_tokens_recomputed"] for r in self.recoveries),
            "kv_backup": {"state": "off"} if self.kv_backup is None else self.kv_backup.status(),
            "weight_cache": cache_status(self.weight_cache_dir),
            "respawns": self.respawns,
            "regrouping": self.regrouping,
            "refused_connections": refused_connections(),  # peers without the deployment's key (ft/sockets.py)
        }


def _load_fields(load: WorkerLoad | None) -> dict:
    if load is None:
        return {}
    return {**msgspec.structs.asdict(load), "kv_bytes_used": load.kv_bytes_used}


def _kv_sender_fields(beat: Heartbeat | None) -> dict:
    if beat is None:
        return {}
    sent, dropped, sent_bytes = beat.kv_backup
    return {"kv_backup_sent": sent, "kv_backup_dropped": dropped, "kv_backup_bytes": sent_bytes,
            "kv_backup_queued": beat.kv_backup_queued}


@dataclass
class PendingRecovery:
    """A regroup the controller ordered and is waiting for every survivor to finish."""

    order: Regroup
    detected_at: float
    detect_ms: float
    waiting: set[int]
    done: list[RegroupDone] = field(default_factory=list)
    last_sent: float = 0.0
    late_stage_ms: dict[str, float] = field(default_factory=dict)  # stages ended before the last RegroupDone

    def still_joining(self) -> tuple[int, ...]:
        """Joiners of this order that have not finished it: they still hold nothing."""
        return tuple(w for w in self.order.joining if w in self.waiting)


def recovery_record(pending: PendingRecovery, now: float) -> dict:
    """What `/ft/status` lists for a finished regroup: the slowest member's time per stage, bytes summed over the
    members, and the most any member recomputed (every member recomputes the same tokens)."""
    stages = {}
    for report in pending.done:
        for stage, ms in report.stage_ms.items():
            stages[stage] = max(stages.get(stage, 0.0), ms)
    stages.update(pending.late_stage_ms)
    return {
        "epoch": pending.order.epoch,
        "cause": pending.order.cause,
        "detect_ms": pending.detect_ms,
        "recover_ms": round((now - pending.detected_at) * 1e3, 1),
        "bytes_p2p": sum(r.bytes_p2p for r in pending.done),
        "bytes_reloaded": sum(r.bytes_reloaded for r in pending.done),
        "bytes_from_host_cache": sum(r.bytes_from_host_cache for r in pending.done),
        "bytes_kept": sum(r.bytes_kept for r in pending.done),
        "expert_bytes_moved": sum(r.expert_bytes_moved for r in pending.done),
        "kv_blocks_restored": sum(r.kv_blocks_restored for r in pending.done),
        "kv_bytes_p2p": sum(r.kv_bytes_p2p for r in pending.done),
        "kv_tokens_recomputed": max(r.kv_tokens_recomputed for r in pending.done),
        "stage_ms": stages,
        "workers": list(pending.order.workers),
        "joined": list(pending.order.joining),
    }
