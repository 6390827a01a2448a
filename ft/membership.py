"""Who is in the TP group, in which epoch, and what state each worker is in (healthy, suspect, dead, joining).

Every change of the group bumps the epoch; a message from an older epoch is fenced: it changes nothing, and its
sender is told to exit. This is plain data: the controller owns one `Membership` and drives it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WorkerState(str, enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DEAD = "dead"
    JOINING = "joining"


@dataclass
class Worker:
    worker: int
    pid: int | None = None
    state: WorkerState = WorkerState.JOINING
    last_beat: float | None = None  # monotonic seconds of the last heartbeat
    max_beat_gap_s: float = 0.0  # longest silence while serving that ended in a beat: the timeout's real margin
    serving: bool = False  # has finished a batch (its beats say so); before that, silence is judged by the startup bound
    dead_since: float | None = None
    step_started: float | None = None  # when its current iteration with work began, from its beats (None: not in one)
    max_step_s: float = 0.0  # the longest iteration its beats reported while serving: the blocked bound's real margin


@dataclass
class Membership:
    """The group's epoch and workers; `members()` are those in the current group, in TP-rank order."""

    epoch: int = 0
    workers: dict[int, Worker] = field(default_factory=dict)
    group: tuple[int, ...] = ()

    @classmethod
    def initial(cls, num_workers: int) -> "Membership":
        return cls(0, {w: Worker(w) for w in range(num_workers)}, tuple(range(num_workers)))

    def is_current(self, epoch: int) -> bool:
        """A message of an older epoch is fenced."""
        return epoch == self.epoch

    def members(self) -> tuple[int, ...]:
        return self.group

    def live_members(self) -> tuple[int, ...]:
        return tuple(w for w in self.group if self.workers[w].state is not WorkerState.DEAD)

    def set_state(self, worker: int, state: WorkerState, now: float | None = None) -> bool:
        """Record a state change; True if it changed."""
        record = self.workers.setdefault(worker, Worker(worker))
        if record.state is state:
            return False
        record.state = state
        if state is WorkerState.DEAD:
            record.dead_since = now
        return True

    def regroup(self, workers: tuple[int, ...]) -> int:
        """Form a new group of `workers` (TP rank r = workers[r]); returns the new epoch."""
        if not workers:
            raise ValueError("a group needs at least one worker")
        self.epoch += 1
        self.group = tuple(workers)
        return self.epoch
