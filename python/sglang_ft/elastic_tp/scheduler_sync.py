"""Bring restarted workers into lockstep: during a regroup with joiners, every rank takes rank 0's scheduler state.

SGLang's TP ranks each run the same scheduler on the same inputs and stay in lockstep: the same waiting queue,
radix tree and free KV slots give the same batches. A restarted worker has none of that. During a regroup every
request is parked (its KV in the radix cache, itself in the waiting queue), so the state that matters is small:
the waiting requests, the cached token sequences with their KV slots, the free slots, the new-token ratio and the
sampling RNG. Rank 0 sends it over the TP group's CPU channel (SGLang's own `broadcast_pyobj`, the way it shares
requests between ranks); every rank, survivors included, rebuilds its radix cache and allocator from it, so all
are identical by construction, and the joiners also take the requests. KV slot numbers do not change: survivors'
KV stays where it is, and joiners receive theirs for the same slots in `restore_kv`.

Not kept: cached prefixes that no waiting request uses (KV of finished requests left in the radix cache). SGLang
0.5.23 keeps its radix tree in a Rust core that cannot be listed from Python, so those slots are freed (and
dropped from the KV backup); such a prefix is recomputed if it is asked for again.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from sglang_ft.mem_cache.kv_backup_stream import slots_in_use
from sglang_ft.mem_cache.radix_lookup import match_request, matched_slots, radix_key
from sglang_ft.sglang_surface import set_free_slots, set_new_token_ratio, set_waiting_queue

logger = logging.getLogger(__name__)
# Fields of a Req that point into this process (its tokenizer, metrics, radix tree nodes and locks): a joiner
# sets its own. Every other field travels; a field that cannot be pickled is left out and named in the log.
LOCAL_REQ_FIELDS = ("tokenizer", "metrics_collector", "last_node", "last_host_node", "best_match_node", "lock")


@dataclass
class CachedSequence:
    """Tokens whose KV lives in `slots` (one slot per token), keyed as the radix cache keys them."""

    token_ids: list[int]
    slots: np.ndarray
    extra_key: str | None
    cache_salt: str | None
    prompt_len: int
    priority: int
    rid: str = ""  # the waiting request it was matched for
    max_new_tokens: int = 0


@dataclass
class SyncStats:
    requests: int = 0
    sequences: int = 0
    cached_tokens: int = 0
    freed_slots: int = 0


def cached_sequences(scheduler) -> list[CachedSequence]:
    """For every waiting request, the longest prefix of its tokens the radix cache holds, with its slots."""
    tree, found = scheduler.tree_cache, []
    for req in scheduler.waiting_queue:
        tokens, match = match_request(tree, req, scheduler.page_size)
        if match.device_prefix_len == 0:
            continue
        slots = matched_slots(tree, match, req).to("cpu", torch.int64).numpy()
        found.append(CachedSequence(tokens[: len(slots)], slots, req.extra_key, req.cache_salt,
                                    len(req.origin_input_ids), req.priority or 0, req.rid,
                                    req.sampling_params.max_new_tokens or 0))
    return found


def portable_request(req) -> tuple[dict, list[str]]:
    """The request's fields that can travel to another process, and the names of those that cannot."""
    state, left_out = {}, []
    for name, value in vars(req).items():
        if name in LOCAL_REQ_FIELDS:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # a handle into this process (a lock, a socket, a C++ object)
            left_out.append(name)
            continue
        state[name] = value
    return state, left_out


def rebuild_request(state: dict, scheduler):
    """A Req equal to rank 0's, with this process's tokenizer and metrics."""
    from sglang_ft.sglang_surface import Req

    req = Req.__new__(Req)
    vars(req).update(state)
    for name in LOCAL_REQ_FIELDS:
        setattr(req, name, None)
    req.tokenizer = scheduler.tokenizer
    stats = getattr(req, "time_stats", None)
    if stats is not None and hasattr(type(stats), "new_from_obj"):
        # SGLang pickles time stats without their tracing context; rebuild them as SGLang does across processes
        req.time_stats = type(stats).new_from_obj(stats)
    if scheduler.metrics_reporter.enable_metrics:  # as SGLang's handle_generate_request does
        req.metrics_collector = scheduler.metrics_collector
    return req


def take_snapshot(scheduler, with_requests: bool) -> dict:
    """Rank 0's scheduler state at a quiet point (every request parked)."""
    snapshot = {
        "sequences": cached_sequences(scheduler),
        "new_token_ratio": scheduler.new_token_ratio_tracker.current,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "requests": None,
    }
    if with_requests:
        requests, left_out = [], set()
        for req in scheduler.waiting_queue:
            state, missing = portable_request(req)
            requests.append(state)
            left_out.update(missing)
        if left_out:
            logger.warning("sglang-ft: request fields that cannot travel to a restarted worker: %s", sorted(left_out))
        snapshot["requests"] = requests
    return snapshot


def _rebuild_tree(scheduler, sequences, num_slots: int, stats: SyncStats) -> torch.Tensor:
    """Reset the radix cache and insert rank 0's sequences with their slots; returns which of `num_slots` they use."""
    from sglang_ft.sglang_surface import InsertParams

    tree = scheduler.tree_cache
    tree.reset()
    scheduler.req_to_token_pool.clear()
    in_use = torch.zeros(num_slots, dtype=torch.bool)
    device = scheduler.token_to_kv_pool_allocator.free_pages.device
    for seq in sequences:
        slots = torch.from_numpy(seq.slots)
        in_use[slots] = True
        value = slots.to(device)
        key = radix_key(seq.token_ids, seq.extra_key, seq.cache_salt, scheduler.page_size)
        tree.insert(InsertParams(key=key, value=value, priority=seq.priority))
        if 0 < seq.prompt_len < len(seq.token_ids):  # SGLang splits at the prompt so eviction keeps prompts
            prompt = radix_key(seq.token_ids[: seq.prompt_len], seq.extra_key, seq.cache_salt, scheduler.page_size)
            tree.insert(InsertParams(key=prompt, value=value[: len(prompt)], priority=seq.priority + 1))
        stats.sequences += 1
    stats.cached_tokens = int(in_use.sum())
    return in_use


def apply_snapshot(scheduler, snapshot: dict, take_requests: bool, kv_stream=None) -> SyncStats:
    """Rebuild this rank's radix cache and allocator (and, on a joiner, its waiting queue) from `snapshot`. Only
    the slots no sequence uses any more are dropped from the KV backup."""
    allocator = scheduler.token_to_kv_pool_allocator
    if getattr(allocator, "page_size", 1) != 1 or not hasattr(allocator, "free_pages"):
        raise NotImplementedError("sglang-ft: re-admitting a worker needs SGLang's token allocator (--page-size 1)")
    stats = SyncStats()
    if take_requests:
        set_waiting_queue(scheduler, [rebuild_request(state, scheduler) for state in snapshot["requests"]])
    stats.requests = len(scheduler.waiting_queue)

    before = slots_in_use(allocator)
    if scheduler.req_to_token_pool.available_size() != scheduler.req_to_token_pool.size:
        raise RuntimeError("sglang-ft: a request still holds a request slot during the scheduler sync")
    with kv_stream.muting_drops() if kv_stream is not None else contextlib.nullcontext():
        in_use = _rebuild_tree(scheduler, snapshot["sequences"], len(before), stats)
    in_use[0] = True  # SGLang's padding slot is never handed out
    device = allocator.free_pages.device
    set_free_slots(allocator, torch.nonzero(~in_use).flatten().to(device, torch.int64))
    freed = torch.nonzero(before & ~in_use).flatten()
    stats.freed_slots = len(freed)
    if kv_stream is not None and len(freed):
        kv_stream.on_slots_freed(allocator, freed)

    set_new_token_ratio(scheduler, snapshot["new_token_ratio"])
    torch.set_rng_state(snapshot["rng"])
    if snapshot["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot["cuda_rng"])
    return stats


def sync_scheduler_state(scheduler, ft_worker, cpu_group, receive: bool) -> SyncStats:
    """Rank 0 broadcasts its state; every rank rebuilds from it; joiners (`receive`) also take the requests."""
    import torch.distributed as dist

    from sglang_ft.sglang_surface import broadcast_pyobj

    rank = dist.get_rank(cpu_group)
    snapshot = take_snapshot(scheduler, with_requests=True) if rank == 0 else None
    snapshot = broadcast_pyobj(snapshot, rank, cpu_group, src=dist.get_process_group_ranks(cpu_group)[0])
    stats = apply_snapshot(scheduler, snapshot, take_requests=receive, kv_stream=ft_worker.kv_stream)
    if receive:
        ft_worker.ledger.record_held(scheduler.waiting_queue)
    return stats
