"""Park every unfinished request in SGLang's radix cache before a regroup, so none is prefilled again.

SGLang's own retract frees a request's KV (it is recomputed on re-admission). Parking instead inserts the KV each
request has committed into the radix cache (SGLang's `release_kv_cache(checkpoint=True)`, the path finished
requests take) and puts the request back in the waiting queue. After the regroup restores every cached slot's KV
(kept heads, peers, the backup store), re-admission matches the whole committed prefix and computes only the
newest token: what the next decode step would have computed anyway.

Which KV is committed: a step that failed mid-forward wrote some layers of its tokens, so those tokens are cut
off, unless another rank completed that step (`torn_step`: then every rank wrote it, and this rank took its
tokens); the newest output token never has KV yet. Ranks agree on the length per request (the minimum), so every
rank's radix tree stays identical.

The free slots end in ascending order. Once parked, the ranks hold the same set of them (identical trees, every
request's row released) but not always in the same order: a rank that had begun the failed decode step took a
slot per request from the head of its free list and gives them back at the tail, while a rank that failed before
the step (in the broadcast of new requests) took none. Slot numbers must stay in lockstep (the KV backup and
restore address a token's rows by its slot on every rank), so every rank sorts its free list; a CI run's lockstep
check caught exactly this difference and flushed every cached prefix.
"""

from __future__ import annotations

from sglang_ft.sglang_surface import forget_running_batch, requeue_retracted, sort_free_slots


def committed_kv_len(req, failed_batch, completed_elsewhere=()) -> int:
    """Tokens of `req` whose KV every layer wrote in a step that completed (here, or on another rank for the
    requests `completed_elsewhere`)."""
    length = req.kv.kv_committed_len
    if failed_batch is not None and any(r is req for r in failed_batch.reqs) \
            and not any(r is req for r in completed_elsewhere):
        length -= 1 if failed_batch.forward_mode.is_decode() else req.extend_len
    newest_without_kv = len(req.origin_input_ids) + len(req.output_ids) - 1
    return max(req.kv.cache_protected_len, min(length, newest_without_kv))


def requests_holding_kv(scheduler, failed_batch) -> list:
    """Unfinished requests that hold KV: the running batch, the last and the failed batch, the chunked request."""
    candidates = list(scheduler.running_batch.reqs)
    for batch in (scheduler.last_batch, failed_batch):
        if batch is not None and batch is not scheduler.running_batch:
            candidates += batch.reqs
    if scheduler.chunked_req is not None:
        candidates.append(scheduler.chunked_req)
    unique = {id(r): r for r in candidates if not r.finished() and r.kv.holds_kv}
    return list(unique.values())


def committed_lengths(scheduler, failed_batch, joining: bool = False, completed_elsewhere=()) -> dict[str, int] | None:
    """What this rank reports: the KV each unfinished request committed (None for a restarted worker, which holds
    no request yet and takes no part: it receives the survivors' state afterwards)."""
    if joining:
        return None
    return {r.rid: committed_kv_len(r, failed_batch, completed_elsewhere)
            for r in requests_holding_kv(scheduler, failed_batch)}


def agreed_lengths(mine: dict[str, int] | None, everyone: list) -> dict[str, int]:
    """Every rank's minimum per request (`everyone`: each rank's `committed_lengths`); a request some rank does not
    hold keeps nothing."""
    holders = [other for other in everyone if other is not None]
    return {rid: min(other.get(rid, 0) for other in holders) for rid in mine or {}}


def park(req, keep: int, tree_cache) -> int:
    """Insert `req`'s first `keep` tokens of KV into the radix cache and release the rest; returns tokens that
    will have to be recomputed (all of them when the radix cache is off for this request)."""
    from sglang_ft.sglang_surface import release_kv_cache

    kv = req.kv
    keep = max(keep, kv.cache_protected_len)
    if keep == 0:  # a new request whose first prefill failed, nothing cached: give its row back whole
        kv.kv_committed_len = kv.kv_allocated_len
        release_kv_cache(req, tree_cache, checkpoint=False)
        req.reset_for_retract()
        return 0
    if kv.kv_allocated_len > keep:
        tree_cache.free_kv_row(kv, [(keep, kv.kv_allocated_len)])
    kv.kv_allocated_len = kv.kv_committed_len = keep
    release_kv_cache(req, tree_cache, checkpoint=True)
    req.reset_for_retract()
    cached = not (getattr(tree_cache, "disable", False) or req.skip_radix_cache_insert)
    return 0 if cached else keep


def park_every_request(scheduler, failed_batch, gather, joining: bool = False,
                       completed_elsewhere=(), everyone: list | None = None) -> tuple[int, int, int]:
    """Park every unfinished request; returns (requests parked, their KV tokens, tokens left to recompute).
    `gather`: this rank's object in, every rank's out (all_gather_object over the group's CPU channel); not called
    when `everyone` holds every rank's `committed_lengths` already (the regroup gathers them with its other
    reports, unless a torn step changed them)."""
    reqs = requests_holding_kv(scheduler, failed_batch)
    mine = committed_lengths(scheduler, failed_batch, joining, completed_elsewhere)
    lengths = agreed_lengths(mine, gather(mine) if everyone is None else everyone)
    recomputed = kept = 0
    allocator = scheduler.token_to_kv_pool_allocator
    allocator.free_group_begin()  # one merge of the free list for all of them, as SGLang's own batch frees do
    try:
        for req in reqs:
            recomputed += park(req, lengths[req.rid], scheduler.tree_cache)
            kept += lengths[req.rid]
    finally:
        allocator.free_group_end()
    sort_free_slots(allocator)  # the same free slots in the same order on every rank (see the module's docstring)
    forget_running_batch(scheduler)
    waiting = {id(r) for r in scheduler.waiting_queue}
    requeue_retracted(scheduler, [req for req in reqs if id(req) not in waiting])  # never turned away as "queue full"
    return len(reqs), kept, recomputed
