"""A request moved from a lost data-parallel replica takes its KV from that replica's backup store.

The lost replica's store holds every KV head's rows of the slots its group wrote, and which slots held each
request (its rank 0 mapped them after every step: `ft.request_slots`). The journal asks it for the slots of each
moved request's tokens and sends them with the request (`replica_move.ResumeTokens`). Here, on every TP rank of
the new replica, the request's tokens get fresh slots in this replica's pool, each rank fetches its own heads'
rows of the old slots from the lost store (under hybrid attention or cyclic placement, the remainder heads' rows
too, placed as a prefill would place them), and prompt plus output go into SGLang's radix cache with those slots.
SGLang's own prefix match then finds them when the request is scheduled: its prefill computes only the newest
token, as if it had never moved.

Every rank must leave its radix cache and allocator identical: the same match, eviction and allocation happen on
each (SGLang's lockstep), and the ranks agree on the fetch (one all-reduce): if any rank's rows are incomplete,
none keeps the slots and the request is prefilled again.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def can_take_kv(scheduler) -> bool:
    """Where the radix cache can hold the request's KV (on, one token a page) and the model is sglang-ft's."""
    runner = scheduler.tp_worker.model_runner
    return (not getattr(scheduler.tree_cache, "disable", True) and scheduler.page_size == 1
            and getattr(runner.model, "shard", None) is not None)


def _room_for(tree, allocator, need: int, node) -> torch.Tensor | None:
    """`need` free slots, evicting unused cached prefixes as SGLang does, but never `node`'s path."""
    from sglang_ft.sglang_surface import EvictParams

    lock = tree.lock(node)
    try:
        if allocator.available_size() < need:
            tree.evict(EvictParams(num_tokens=need - allocator.available_size()))
        return allocator.alloc(need) if allocator.available_size() >= need else None
    finally:
        tree.unlock(lock)


def take_over_kv(scheduler, req, endpoint: str, old_slots: list[int], kv_stream=None) -> int:
    """Give queued `req` the KV of its first `len(old_slots)` tokens from the lost replica's store at `endpoint`;
    returns how many tokens it will not compute again (0 when it cannot: then it is prefilled as any request)."""
    from sglang_ft.sglang_surface import InsertParams, MatchPrefixParams

    from sglang_ft.distributed.rank_agreement import any_rank
    from sglang_ft.elastic_tp.kv_restore import fetch_rows, put_rows
    from sglang_ft.layers.attention import remainder_placement
    from sglang_ft.mem_cache.radix_lookup import matched_slots, radix_key

    if not old_slots or not can_take_kv(scheduler):
        return 0
    tree, allocator = scheduler.tree_cache, scheduler.token_to_kv_pool_allocator
    tokens = (list(req.origin_input_ids) + list(req.output_ids))[: len(old_slots)]
    key = radix_key(tokens, req.extra_key, req.cache_salt, 1)
    match = tree.match_prefix(MatchPrefixParams(key=key))
    have, node = match.device_prefix_len, match.last_device_node  # cached here already: not fetched
    if have >= len(tokens):
        return have
    new_slots = _room_for(tree, allocator, len(tokens) - have, node)
    if new_slots is None:  # the same on every rank: their allocators and trees are in lockstep
        logger.warning("sglang-ft: no room for the KV of moved request %s; it is prefilled again", req.rid)
        return 0
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    heads = scheduler.tp_worker.model_runner.model.shard.kv_heads
    wanted = torch.as_tensor(np.asarray(old_slots[have:], dtype=np.int64))
    fetched = fetch_rows(endpoint, 0, heads, wanted, (), pool.k_buffer[0].dtype)
    complete = fetched is not None and fetched[2] is not None and bool(fetched[2].all())
    prefix = matched_slots(tree, match, req).to("cpu", torch.int64)
    placement = remainder_placement.active()  # hybrid attention or cyclic placement: the remainder heads' rows
    if placement is not None:
        old_of = dict(zip(new_slots.tolist(), wanted.tolist(), strict=True))
        _, missing = placement.take_moved(prefix, new_slots.to("cpu", torch.int64), lambda span, slots: fetch_rows(
            endpoint, 0, span, torch.tensor([old_of[int(s)] for s in slots]), (), placement.pool.k.dtype))
        complete = complete and not missing
    if any_rank(not complete, scheduler.tp_cpu_group):
        if placement is not None:
            placement.release_slots(new_slots)  # (SGLang's free below does too, through sglang-ft's hook)
        allocator.free(new_slots)
        logger.warning("sglang-ft: the lost replica's store lacks KV of moved request %s; it is prefilled again",
                       req.rid)
        return 0
    k, v, _found = fetched
    put_rows(pool, new_slots.to(pool.k_buffer[0].device), slice(None), k, v)  # as a regroup's restore writes them
    if kv_stream is not None:  # written outside the forward: back them up here too
        kv_stream.back_up_slots(new_slots)
    prefix = prefix.to(new_slots.device)
    # prev_prefix_len: the matched prefix's slots are the tree's own, not duplicates for SGLang's insert to free
    tree.insert(InsertParams(key=key, value=torch.cat([prefix, new_slots.to(torch.int64)]), prev_prefix_len=have,
                             inserted_len=have, priority=req.priority or 0))
    return len(tokens)
