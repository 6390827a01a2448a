"""Which data-parallel replica serves each request, under `--ft --dp-size M`.

SGLang's DataParallelController sends a tokenized request that carries `routed_dp_rank` straight to that replica.
So sglang-ft chooses in the tokenizer manager, where its journal (sent_requests.py) already sees every request
sent and every token received: the replica is set on the request before SGLang dispatches it, with the policy of
`--ft-routing` (the same `RequestRouter` that places hybrid attention's remainder heads, here over replicas):
- load: the replica with the fewest outstanding tokens (prompt plus tokens still to generate);
- prefix_load: the replica that was sent the longest prefix of this prompt (its radix cache most likely holds
  it), unless it is over the load threshold; like SGLang's cache-aware router, the prefixes are an approximate
  tree kept on the routing side, not read from the replicas' caches;
- round_robin: in turn.
A replica whose controller reports its group lost is routed around, and its unfinished requests are given to the
others (`lose`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from ft.remainder_routing import RequestRouter

PREFIX_BLOCK = 16  # tokens per prefix-tree node: SGLang's radix cache matches any length, this approximates it
PREFIX_CAPACITY = 1 << 16  # prefix blocks remembered (least recently routed forgotten first)
REFRESH_EVERY_S = 0.01  # loads are re-read from the request states at most this often (a burst adds its own)


class PrefixIndex:
    """The replica each token prefix was last routed to, by chained hashes of `block`-token blocks (bounded)."""

    def __init__(self, block: int = PREFIX_BLOCK, capacity: int = PREFIX_CAPACITY):
        self.block = block
        self.capacity = capacity
        self.replica_of: OrderedDict[int, int] = OrderedDict()

    def _keys(self, ids) -> list[int]:
        keys, key = [], 0
        for start in range(0, len(ids) - len(ids) % self.block, self.block):
            key = hash((key, tuple(ids[start:start + self.block])))
            keys.append(key)
        return keys

    def owner(self, ids) -> int | None:
        """The replica holding the longest known prefix of `ids` (whole blocks), or None."""
        owner = None
        for key in self._keys(ids):
            if key not in self.replica_of:
                break
            owner = self.replica_of[key]
        return owner

    def record(self, ids, replica: int) -> None:
        for key in self._keys(ids):
            self.replica_of[key] = replica
            self.replica_of.move_to_end(key)
        while len(self.replica_of) > self.capacity:
            self.replica_of.popitem(last=False)

    def forget(self, replica: int) -> None:
        self.replica_of = OrderedDict((k, r) for k, r in self.replica_of.items() if r != replica)


class ReplicaRouter:
    """The replica of every unfinished request, over `replicas` data-parallel replicas."""

    def __init__(self, replicas: int, policy: str = "prefix_load"):
        self.replicas = replicas
        self.router = RequestRouter(tuple(range(replicas)), policy)
        self.prefixes = PrefixIndex()
        self.lost: set[int] = set()
        self.moved_total = 0  # requests moved off a lost replica (counted by the journal as it sends them)
        self.tokens_recomputed = 0  # moved requests' tokens whose KV existed but is computed again on the new replica
        self.tokens_taken_over = 0  # those whose KV the lost replica's backup store holds, sent with the request
        self.total_of: dict[str, int] = {}  # rid -> prompt plus max new tokens
        self.refreshed_at = float("-inf")

    def route(self, rid: str, ids, tokens: int, wanted: int | None = None) -> int:
        """The replica for request `rid` (`ids` its prompt, `tokens` the work it owes); `wanted` is the client's own
        `routed_dp_rank`, kept unless that replica is lost. A rid already routed keeps its replica."""
        if rid in self.router.owner_of:
            return self.router.owner_of[rid]
        self.total_of[rid] = tokens
        if wanted is not None and wanted in self.router.workers:
            self.router.assign(rid, tokens, wanted)
            replica = wanted
        else:
            replica = self.router.admit(rid, tokens, self.prefixes.owner(ids))
        self.prefixes.record(ids, replica)
        return replica

    def replica_of(self, rid: str) -> int | None:
        return self.router.owner_of.get(rid)

    def refresh(self, states: dict, force: bool = False) -> None:
        """Bring loads up to date from the tokenizer manager's request states (rid -> state with `finished` and the
        `output_ids` received): finished or forgotten requests leave, the others owe what they have not produced.
        At most every REFRESH_EVERY_S unless forced: a burst of arrivals would otherwise re-read every state each."""
        now = time.monotonic()
        if not force and now - self.refreshed_at < REFRESH_EVERY_S:
            return
        self.refreshed_at = now
        for rid in list(self.router.owner_of):
            state = states.get(rid)
            if state is None or state.finished:
                self.router.release(rid)
                self.total_of.pop(rid, None)
            else:
                self.router.progress(rid, self.total_of[rid] - len(state.output_ids))

    def lose(self, replica: int) -> dict[str, int]:
        """`replica` serves nothing more: route around it; returns {rid: new replica} of its unfinished requests
        (the most outstanding first to the least loaded), empty when no replica is left to take them."""
        if replica in self.lost:
            return {}
        self.lost.add(replica)
        self.prefixes.forget(replica)
        live = tuple(r for r in self.router.workers if r != replica)
        if not live:
            return {}
        return self.router.regroup(live)

    def live_mask(self) -> list[bool]:
        """Per replica, whether it still serves (SGLang's `ActiveRanksOutput.status`)."""
        return [r not in self.lost for r in range(self.replicas)]

    def status(self) -> dict:
        loads = self.router.load()
        return {"policy": self.router.policy, "live_replicas": list(self.router.workers), "lost": sorted(self.lost),
                "outstanding_tokens": {str(r): loads[r] for r in self.router.workers},
                "requests": {str(r): sum(1 for o in self.router.owner_of.values() if o == r)
                             for r in self.router.workers},
                "moved_requests": self.moved_total, "moved_tokens_recomputed": self.tokens_recomputed,
                "moved_tokens_kv_taken_over": self.tokens_taken_over}
