"""When to restart a dead worker, and when to give up on one that never came back (pure: time is passed in).

A worker declared dead is restarted `delay_s` later (automatically with `--ft-respawn`, or at once when an
operator asks for a rejoin). The restarted process initialises on its own, then beats as `joining`; the
controller plans it back into the group. A restart that does not become ready within `ready_timeout_s`, or dies
first, counts as a failed attempt; after `max_attempts` automatic attempts a worker is left dead (a GPU that
keeps failing), and only an operator's rejoin tries again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RespawnPolicy:
    automatic: bool = False
    delay_s: float = 5.0
    max_attempts: int = 3
    ready_timeout_s: float = 600.0


@dataclass
class Respawner:
    policy: RespawnPolicy
    attempts: dict[int, int] = field(default_factory=dict)  # automatic attempts since the worker last joined
    due: dict[int, float] = field(default_factory=dict)  # worker -> when to start it
    starting: dict[int, float] = field(default_factory=dict)  # worker -> when it was started (not ready yet)

    def on_dead(self, worker: int, now: float) -> None:
        """`worker` died (a member, or a restart that failed): schedule the next automatic attempt, if any."""
        self.starting.pop(worker, None)
        if self.policy.automatic and self.attempts.get(worker, 0) < self.policy.max_attempts:
            self.due.setdefault(worker, now + self.policy.delay_s)

    def request(self, worker: int, now: float) -> bool:
        """An operator asks for `worker` back now; False if it is already being started."""
        if worker in self.starting:
            return False
        self.due[worker] = now
        return True

    def take_due(self, now: float, startable) -> list[int]:
        """Workers whose restart is due and `startable(worker)` allows; they count as starting from now."""
        ready = sorted(w for w, at in self.due.items() if at <= now and startable(w))
        for worker in ready:
            del self.due[worker]
            self.starting[worker] = now
            self.attempts[worker] = self.attempts.get(worker, 0) + 1
        return ready

    def overdue(self, now: float) -> list[int]:
        """Restarted workers that never became ready in time (treat them as dead again)."""
        return sorted(w for w, at in self.starting.items() if now - at > self.policy.ready_timeout_s)

    def on_ready(self, worker: int) -> None:
        self.starting.pop(worker, None)

    def on_joined(self, worker: int) -> None:
        """Back in the group: the next failure gets the full number of automatic attempts again."""
        self.starting.pop(worker, None)
        self.attempts.pop(worker, None)
