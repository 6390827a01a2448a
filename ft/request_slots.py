"""Which token slots hold each running request's KV, as the backup store learns it from the group's TP rank 0.

The store keys KV rows by slot, and slots mean something only inside one TP group's allocator. To move a request
to another group (a data-parallel replica that lost every worker) with its KV, something alive must know which
slots that request's tokens were in: rank 0 sends, after each step, the slots of the tokens the step wrote
(`ReqSlots`: a whole row after a prefill, the one new slot after a decode), and the store keeps them here.

A slot can be freed and handed to another request while a stale map still names it. The store counts the drops
of every slot (`generation`); each recorded position keeps the count it saw, and a position whose slot was dropped
since is not trusted. Rank 0's own drops reach the store before its later maps (one socket, in order), so a reused
slot is never read as the old request's; another rank's late drop can only make the store trust less.

Bounded whatever rank 0 (or a forger) sends: a row never outgrows the pool (the store refuses positions beyond its
slot count), and all rows together hold at most `POSITIONS_PER_SLOT` positions per slot of the pool, the least
recently updated rows dropped first (a running request's row is updated every step).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MAX_REQUESTS = 4096  # maps kept, least recently updated dropped first (a finished request is never asked for)
POSITIONS_PER_SLOT = 16  # positions kept in all per pool slot (requests sharing a cached prefix map its slots each)


class _Row:
    """One request's slots and their drop counts, grown by doubling (a decode appends one position a step)."""

    def __init__(self):
        self.slots = np.full(16, -1, dtype=np.int64)
        self.gens = np.zeros(16, dtype=np.int64)
        self.length = 0

    def put(self, start: int, slots: np.ndarray, gens: np.ndarray, pool_slots: int) -> None:
        end = start + len(slots)
        if end > len(self.slots):
            capacity = max(end, min(2 * len(self.slots), pool_slots))
            self.slots = np.concatenate([self.slots, np.full(capacity - len(self.slots), -1, dtype=np.int64)])
            self.gens = np.concatenate([self.gens, np.zeros(capacity - len(self.gens), dtype=np.int64)])
        if start > self.length:  # positions never reported (a lost message): unknown
            self.slots[self.length : start] = -1
        self.slots[start:end], self.gens[start:end] = slots, gens
        self.length = end if start == 0 else max(end, self.length)  # a whole row (re-)starts the request's map


class RequestSlotMap:
    def __init__(self, max_requests: int = MAX_REQUESTS):
        self.max_requests = max_requests
        self._rows: OrderedDict[str, _Row] = OrderedDict()
        self.positions = 0  # capacity of every row together

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, rid: str, start: int, slots: np.ndarray, generation: np.ndarray) -> None:
        """Positions `start..start+len(slots)` of `rid` are in `slots`, whose drop counts are now
        `generation[slots]`."""
        row = self._rows.pop(rid, None) or _Row()
        self.positions -= len(row.slots)
        row.put(start, slots, generation[slots], len(generation))
        self.positions += len(row.slots)
        self._rows[rid] = row
        budget = POSITIONS_PER_SLOT * len(generation)
        while len(self._rows) > self.max_requests or (self.positions > budget and len(self._rows) > 1):
            self.positions -= len(self._rows.popitem(last=False)[1].slots)

    def trusted_prefix(self, rid: str, limit: int, generation: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The slots of `rid`'s first positions, up to `limit`, while each is known, undropped since recorded and
        `valid` (the store holds its rows for every head and layer)."""
        row = self._rows.get(rid)
        if row is None:
            return np.empty(0, dtype=np.int64)
        n = min(limit, row.length)
        slots, gens = row.slots[:n], row.gens[:n]
        known = slots >= 0
        safe = np.where(known, slots, 0)
        good = known & (generation[safe] == gens) & valid[safe]
        bad = np.flatnonzero(~good)
        return slots[: bad[0]].copy() if len(bad) else slots.copy()
