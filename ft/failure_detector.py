"""Heartbeat failure detection: a worker silent for `interval * 2` is suspect, silent for `timeout` is dead, and
silent for `interval * 2` while a peer is blocked in a step is dead at once.

Time is passed in, never read, so the detector is deterministic under test. A SIGKILLed worker stops beating
(and its process exit is reported at once by whoever watches pids); a SIGSTOPped one stops beating too and is
caught by the same timeout, or sooner by a blocked peer (below).

A worker that has not yet finished a batch (starting, or restarted and rejoining) is judged by a longer startup
bound: loading weights and the first forward hold the GIL in long C calls (0.4-0.55 s heartbeat gaps measured on
2 cores), while a serving worker's gaps stay far below the timeout (0.25 s under load, the same machine). A short
timeout then detects hangs fast without declaring starting workers dead.

A hang is confirmed early by a blocked peer. A stopped (or cut-off) worker stops beating, and its peers stop
finishing their iterations: each waits in a collective for it. Every beat says how long its worker's current
scheduler iteration with work has run; a serving member silent for the suspect threshold while another serving
member, beating on time, has been in one iteration for `blocked_after_s` is declared dead then, not at the timeout.
The bound is the longest stall to ride out (a quarter of the timeout: the chaos soak's SIGSTOPs) plus a normal
iteration under load with margin (`STEP_MARGIN_S`, measured). A long step on every member (a long prompt's
prefill) leaves every beat fresh, so it confirms nothing; a worker that has not finished a batch keeps its startup
bound and confirms no one's hang; a group of one has no peer, so the timeout applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from ft.membership import Membership, WorkerState


# A normal scheduler iteration under load, with margin: the longest a beat reported at TP 2 under a 4-client load on
# 2 cores with other test runs competing was 174 ms (benchmark/results/hang_detection.json), and a stopped worker's
# first beat after SIGCONT may come some tens of ms late.
STEP_MARGIN_S = 0.25


HEARTBEAT_TIMEOUT = "heartbeat timeout"  # the causes of a death declared for silence
HANG_CONFIRMED = "hang confirmed by a blocked peer"


def declared_for_silence(cause: str) -> bool:
    """A death declared because the worker stopped beating: at the timeout, or sooner with a peer blocked on it."""
    return HEARTBEAT_TIMEOUT in cause or HANG_CONFIRMED in cause


def startup_timeout(timeout_s: float) -> float:
    """How long a worker that has not finished a batch yet may stay silent: 5 timeouts, at least 10 s."""
    return max(10.0, 5 * timeout_s)


def blocked_bound(timeout_s: float) -> float:
    """How long a peer must have been in one iteration to confirm a silent worker's hang: a quarter of the timeout
    (the longest stall ridden out) plus a normal iteration."""
    return timeout_s / 4 + STEP_MARGIN_S


@dataclass(frozen=True)
class Transition:
    worker: int
    state: WorkerState
    silent_s: float
    cause: str = ""


class FailureDetector:
    def __init__(self, membership: Membership, interval_s: float, timeout_s: float):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"need 0 < heartbeat interval ({interval_s}s) < timeout ({timeout_s}s)")
        self.membership = membership
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout(timeout_s)
        self.suspect_after_s = min(2 * interval_s, timeout_s / 2)
        self.blocked_after_s = blocked_bound(timeout_s)

    def beat(self, worker: int, pid: int, now: float, serving: bool = True,
             step_running_s: float = 0.0) -> Transition | None:
        """Record a heartbeat and how long its worker's current iteration has run; a suspect or joining worker that
        beats becomes healthy again."""
        record = self.membership.workers.get(worker)
        if record is None or record.state is WorkerState.DEAD:
            return None
        if record.last_beat is not None and record.pid == pid and record.serving:
            record.max_beat_gap_s = max(record.max_beat_gap_s, now - record.last_beat)
        if serving:
            record.max_step_s = max(record.max_step_s, step_running_s)
        record.pid, record.last_beat, record.serving = pid, now, serving
        record.step_started = now - step_running_s if step_running_s > 0 else None
        if self.membership.set_state(worker, WorkerState.HEALTHY, now):
            return Transition(worker, WorkerState.HEALTHY, 0.0)
        return None

    def sweep(self, now: float, confirm_hangs: bool = True) -> list[Transition]:
        """Suspect or declare dead every group member whose heartbeats stopped; with `confirm_hangs` (not while a
        regroup is under way: its members leave their iterations, and may hold the GIL loading weights), a silent
        serving member is dead at once when a peer is blocked."""
        changes = []
        for worker in self.membership.members():
            record = self.membership.workers[worker]
            if record.state is WorkerState.DEAD or record.last_beat is None:
                continue
            silent = now - record.last_beat
            if silent >= (self.timeout_s if record.serving else self.startup_timeout_s):
                state, cause = WorkerState.DEAD, HEARTBEAT_TIMEOUT
            elif silent >= self.suspect_after_s:
                peer = self.blocked_peer(worker, now) if confirm_hangs and record.serving else None
                state, cause = (WorkerState.SUSPECT, "missed heartbeats") if peer is None else \
                    (WorkerState.DEAD, f"{HANG_CONFIRMED} (worker {peer[0]} blocked "
                                       f"{peer[1] * 1e3:.0f} ms)")
            else:
                continue
            if self.membership.set_state(worker, state, now):
                changes.append(Transition(worker, state, silent, cause))
        return changes

    def blocked_s(self, worker: int, now: float) -> float | None:
        """How long `worker` has been in its current iteration, from its beats, or None when it is in none. Past
        its last beat the estimate runs on one interval at most: a later beat would have said if it had ended."""
        record = self.membership.workers.get(worker)
        if record is None or record.step_started is None or record.last_beat is None:
            return None
        return min(now, record.last_beat + self.interval_s) - record.step_started

    def blocked_peer(self, worker: int, now: float) -> tuple[int, float] | None:
        """(peer, seconds) of the longest-blocked other serving member that beats on time and has been in one
        iteration for `blocked_after_s`, or None."""
        found = None
        for peer in self.membership.live_members():
            record = self.membership.workers[peer]
            if (peer == worker or not record.serving or record.last_beat is None
                    or now - record.last_beat >= self.suspect_after_s):
                continue  # itself, a starting worker, or a peer whose own report is stale
            blocked = self.blocked_s(peer, now)
            if blocked is not None and blocked >= self.blocked_after_s and (found is None or blocked > found[1]):
                found = (peer, blocked)
        return found

    def declare_dead(self, worker: int, now: float) -> Transition | None:
        """A process exit or a failed collective: dead at once, without waiting for the timeout."""
        record = self.membership.workers.get(worker)
        if record is None or not self.membership.set_state(worker, WorkerState.DEAD, now):
            return None
        return Transition(worker, WorkerState.DEAD, now - (record.last_beat or now))
