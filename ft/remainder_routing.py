"""Hybrid attention's placement: which worker holds and computes each request's remainder heads.

After a failure, H KV heads over W workers rarely divide: `H // W` heads per worker run as tensor-parallel
attention, and the `H % W` remainder heads run as data-parallel attention, each request's remainder heads (their
KV and their attention) whole on one worker, its owner. Choosing owners well is what balances the group: every
worker then stores and computes the same share of remainder work, instead of one worker holding an extra head for
every request (FailSafe's cyclic placement and hybrid attention are this one mechanism, per request).

Every TP rank runs SGLang's scheduler on the same inputs, so every rank makes this choice itself, from state they
all share (the requests admitted and their sizes), and they agree without exchanging a message.

Policies (`--ft-routing`):
- `round_robin`: owners in turn.
- `load`: the worker with the fewest outstanding tokens (prompt plus tokens still to generate, of the requests it
  owns), the lowest worker first on a tie.
- `prefix_load`: the worker that already holds the request's cached prefix (its remainder KV is there), unless
  that worker is overloaded, then as `load`; overloaded as in SGLang's cache-aware router: its load exceeds the
  least loaded worker's by more than `absolute_tokens` and by more than `relative` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("round_robin", "load", "prefix_load")


def remainder_split(num_kv_heads: int, workers: int) -> tuple[int, int]:
    """(heads each worker runs as tensor-parallel attention, remainder heads run as data-parallel attention)."""
    if workers <= 0 or num_kv_heads < workers:
        raise ValueError(f"cannot split {num_kv_heads} KV heads over {workers} workers")
    return divmod(num_kv_heads, workers)


@dataclass(frozen=True)
class BalanceThresholds:
    absolute_tokens: int = 256
    relative: float = 1.5


@dataclass
class RequestRouter:
    """The owner of every unfinished request among `workers`, by policy and outstanding tokens: a worker of one group
    for hybrid attention's remainder heads, or a data-parallel replica under `--dp-size` (replica_router.py)."""

    workers: tuple[int, ...]
    policy: str = "prefix_load"
    thresholds: BalanceThresholds = field(default_factory=BalanceThresholds)
    owner_of: dict[str, int] = field(default_factory=dict)
    tokens_of: dict[str, int] = field(default_factory=dict)
    _turn: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.workers:
            raise ValueError("a group needs at least one worker")

    def load(self) -> dict[int, int]:
        """Outstanding tokens per worker."""
        loads = dict.fromkeys(self.workers, 0)
        for rid, owner in self.owner_of.items():
            loads[owner] += self.tokens_of[rid]
        return loads

    def _least_loaded(self, loads: dict[int, int]) -> int:
        return min(self.workers, key=lambda w: (loads[w], w))

    def _overloaded(self, worker: int, loads: dict[int, int]) -> bool:
        least = min(loads.values())
        mine = loads[worker]
        return mine - least > self.thresholds.absolute_tokens and mine > self.thresholds.relative * least

    def choose(self, prefix_owner: int | None = None) -> int:
        """The owner for a new request (not recorded; see `admit`)."""
        if self.policy == "round_robin":
            return self.workers[self._turn % len(self.workers)]
        loads = self.load()
        if self.policy == "prefix_load" and prefix_owner in loads and not self._overloaded(prefix_owner, loads):
            return prefix_owner
        return self._least_loaded(loads)

    def admit(self, rid: str, tokens: int, prefix_owner: int | None = None) -> int:
        """Record request `rid` (owing `tokens` tokens of work) with the owner chosen for it; returns the owner."""
        if rid in self.owner_of:
            return self.owner_of[rid]
        owner = self.choose(prefix_owner)
        self._turn += 1
        self.owner_of[rid], self.tokens_of[rid] = owner, max(0, tokens)
        return owner

    def assign(self, rid: str, tokens: int, owner: int) -> None:
        """Record `rid` with an owner chosen elsewhere (a regroup placing the requests it resumes)."""
        if owner not in self.workers:
            raise ValueError(f"worker {owner} is not in the group {self.workers}")
        self.owner_of[rid], self.tokens_of[rid] = owner, max(0, tokens)

    def progress(self, rid: str, tokens_left: int) -> None:
        """`rid` now owes `tokens_left` tokens (after a step generated some)."""
        if rid in self.tokens_of:
            self.tokens_of[rid] = max(0, tokens_left)

    def release(self, rid: str) -> None:
        """`rid` finished or was aborted."""
        self.owner_of.pop(rid, None)
        self.tokens_of.pop(rid, None)

    def regroup(self, workers: tuple[int, ...]) -> dict[str, int]:
        """The group became `workers`: requests owned by a worker that left move, the most outstanding first, to
        the least loaded; returns {rid: new owner} of those that moved (their remainder KV must follow)."""
        if not workers:
            raise ValueError("a group needs at least one worker")
        self.workers = tuple(workers)
        orphans = sorted((rid for rid, owner in self.owner_of.items() if owner not in workers),
                         key=lambda rid: (-self.tokens_of[rid], rid))
        for rid in orphans:
            del self.owner_of[rid]
        moved = {}
        for rid in orphans:
            moved[rid] = self.owner_of[rid] = self._least_loaded(self.load())
        return moved
