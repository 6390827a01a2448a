"""A regroup's check once every request is parked: do the ranks' schedulers agree on what shapes a batch?

SGLang's TP ranks each choose their next batch from their own waiting queue, radix cache and free KV slots, and
stay in lockstep only while those are the same. Every regroup stage is written to keep them the same, but a failure
can tear a step at different points on different ranks, and a difference that slips through breaks what follows:
the KV restore moves rows by slot (a peer sends the rows of the slots it holds) and the first batch after resuming
differs in size between ranks (gloo aborts a rank, ending the group; NCCL could silently mix requests). A clean run
met one such case (a prefill finished on one rank only, fixed in park_requests; this check found it again when that
fix was taken out).

So each rank reports a fingerprint of that state (the waiting queue in order with each request's token count and
cached prefix, the free slots and their order, the radix cache's size); where any rank differs, every rank logs
where, flushes its radix cache and takes rank 0's queue order: the parked requests then prefill their tokens again
(the fallback a lost KV pool takes), which costs time, never correctness. Requests only some ranks hold are left to
the reconcile stage (`comparable`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


MATCHED_REQUESTS = 256  # the queue's head, whose cached prefixes the next batches use; the rest by rid and length


def fingerprint(scheduler) -> tuple:
    """What decides the next batches on this rank, in a form equal on ranks in lockstep: the waiting requests in
    order as (rid, tokens, tokens cached; -1 past the queue's head, which is not matched: a flood of queued requests
    must not lengthen the regroup), the free KV slots in their order, the radix cache's evictable and locked
    tokens."""
    from sglang_ft.mem_cache.radix_lookup import match_request

    tree = scheduler.tree_cache
    waiting = []
    for position, req in enumerate(scheduler.waiting_queue):
        if position < MATCHED_REQUESTS:
            tokens, match = match_request(tree, req, scheduler.page_size)
            waiting.append((req.rid, len(tokens), match.device_prefix_len))
        else:
            waiting.append((req.rid, len(req.origin_input_ids) + len(req.output_ids), -1))
    return (tuple(waiting), free_slots_digest(scheduler.token_to_kv_pool_allocator), tree.evictable_size(),
            tree.protected_size())


def free_slots_digest(allocator) -> tuple[int, int]:
    """(free slots, a checksum of the order they will be handed out in). Slot numbers must stay in lockstep, not
    only their count: the KV backup and restore address a token's rows by its slot on every rank. SGLang hands out
    `free_pages` in order and, where it sorts, merges `release_pages` sorted first."""
    import torch

    released = allocator.release_pages
    free = torch.cat([allocator.free_pages, released.sort().values if allocator.need_sort else released])
    weights = torch.arange(1, len(free) + 1, dtype=torch.int64, device=free.device)
    return allocator.available_size(), int((free.to(torch.int64) * weights).sum())  # int64 wraps alike everywhere


def comparable(everyone: list) -> list:
    """The fingerprints as the check compares them: each queue reduced to the requests every rank holds. A request
    only some ranks received (a failure cut the broadcast of new requests short: those ranks began its prefill,
    the others never saw it) kept no KV anywhere (its prefill failed) and is the next stage's to settle
    (`received_requests.reconcile` keeps the requests all hold and has rank 0 send the others again); flushing for
    it recomputed every parked request (a stream-stall run met it). A request's cached prefix counts only where
    every rank matched it (past the queue's head it is not matched, and a request the others lack shifts the
    head)."""
    rids = [{entry[0] for entry in waiting} for waiting, *_ in everyone]
    common = set.intersection(*rids) if rids else set()
    unmatched = {rid for waiting, *_ in everyone for rid, _tokens, cached in waiting if cached < 0}
    return [(tuple((rid, tokens, None if rid in unmatched else cached) for rid, tokens, cached in waiting
                   if rid in common), *rest) for waiting, *rest in everyone]


def describe_difference(everyone: list) -> str:
    """Where the fingerprints part, for the log (the whole queues can be long): each rank's sizes and what of
    them differs from rank 0's."""
    parts = []
    first_waiting, (_free, first_order), *_ = everyone[0]
    for rank, (waiting, (free, order), evictable, protected) in enumerate(everyone):
        differing = [entry for entry in waiting if entry not in first_waiting][:3]
        missing = [entry for entry in first_waiting if entry not in waiting][:3]
        unlike = ([f"queue entries {differing}"] if differing else []) + \
            ([f"lacks {missing}"] if missing else []) + \
            (["queue order"] if not (differing or missing) and waiting != first_waiting else []) + \
            (["free-slot order"] if order != first_order and free == everyone[0][1][0] else [])
        parts.append(f"rank {rank}: {len(waiting)} waiting, {free} free slots, {evictable} cached (+{protected} "
                     f"locked) tokens" + (f", unlike rank 0: {', '.join(unlike)}" if unlike else ""))
    return "; ".join(parts)


def in_rank_zero_order(waiting: list, rank_zero_waiting: tuple) -> list:
    """`waiting` (requests) in rank 0's order of their rids; any rank 0 lacks keep their order, after."""
    position = {entry[0]: i for i, entry in enumerate(rank_zero_waiting)}
    return sorted(waiting, key=lambda req: position.get(req.rid, len(position)))


def agree_or_flush(scheduler, everyone: list, flush) -> bool:
    """Compare every rank's `fingerprint` (`everyone`, in rank order: the regroup gathers them with the reconcile
    stage's reports); where they differ, `flush` the radix cache here and order the queue as rank 0's. Returns
    whether they differed (the same answer on every rank)."""
    from sglang_ft.sglang_surface import set_waiting_queue

    compared = comparable(everyone)
    if all(theirs == compared[0] for theirs in compared):
        return False
    logger.error("sglang-ft: the ranks' schedulers differ after parking (%s); every rank flushes its radix cache "
                 "and the parked requests compute their tokens again", describe_difference(compared))
    flush()
    set_waiting_queue(scheduler, in_rank_zero_order(scheduler.waiting_queue, everyone[0][0]))
    return True
