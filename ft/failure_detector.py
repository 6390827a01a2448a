"""Heartbeat failure detection: a worker silent for `interval * 2` is suspect, silent for `timeout` is dead.

Time is passed in, never read, so the detector is deterministic under test. A SIGKILLed worker stops beating
(and its process exit is reported at once by whoever watches pids); a SIGSTOPped one stops beating too and is
caught by the same timeout.

A worker that has not yet finished a batch (starting, or restarted and rejoining) is judged by a longer startup
bound: loading weights and the first forward hold the GIL in long C calls (0.4-0.55 s heartbeat gaps measured on
2 cores), while a serving worker's gaps stay far below the timeout (0.25 s under load, the same machine). A short
timeout then detects hangs fast without declaring starting workers dead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ft.membership import Membership, WorkerState


def startup_timeout(timeout_s: float) -> float:
    """How long a worker that has not finished a batch yet may stay silent: 5 timeouts, at least 10 s."""
    return max(10.0, 5 * timeout_s)


@dataclass(frozen=True)
class Transition:
    worker: int
    state: WorkerState
    silent_s: float


class FailureDetector:
    def __init__(self, membership: Membership, interval_s: float, timeout_s: float):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"need 0 < heartbeat interval ({interval_s}s) < timeout ({timeout_s}s)")
        self.membership = membership
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout(timeout_s)
        self.suspect_after_s = min(2 * interval_s, timeout_s / 2)

    def beat(self, worker: int, pid: int, now: float, serving: bool = True) -> Transition | None:
        """Record a heartbeat; a suspect or joining worker that beats becomes healthy again."""
        record = self.membership.workers.get(worker)
        if record is None or record.state is WorkerState.DEAD:
            return None
        if record.last_beat is not None and record.pid == pid and record.serving:
            record.max_beat_gap_s = max(record.max_beat_gap_s, now - record.last_beat)
        record.pid, record.last_beat, record.serving = pid, now, serving
        if self.membership.set_state(worker, WorkerState.HEALTHY, now):
            return Transition(worker, WorkerState.HEALTHY, 0.0)
        return None

    def sweep(self, now: float) -> list[Transition]:
        """Suspect or declare dead every group member whose heartbeats stopped."""
        changes = []
        for worker in self.membership.members():
            record = self.membership.workers[worker]
            if record.state is WorkerState.DEAD or record.last_beat is None:
                continue
            silent = now - record.last_beat
            if silent >= (self.timeout_s if record.serving else self.startup_timeout_s):
                state = WorkerState.DEAD
            elif silent >= self.suspect_after_s:
                state = WorkerState.SUSPECT
            else:
                continue
            if self.membership.set_state(worker, state, now):
                changes.append(Transition(worker, state, silent))
        return changes

    def declare_dead(self, worker: int, now: float) -> Transition | None:
        """A process exit or a failed collective: dead at once, without waiting for the timeout."""
        record = self.membership.workers.get(worker)
        if record is None or not self.membership.set_state(worker, WorkerState.DEAD, now):
            return None
        return Transition(worker, WorkerState.DEAD, now - (record.last_beat or now))
