"""Reshape an SGLang MHA KV pool to this rank's new KV heads and fill it: kept heads in place, moved heads from
their live holder (peer to peer), lost heads from the backup store.

Token slots and `req_to_token` keep their meaning on every rank (SGLang's allocators are in lockstep), so only
the head dimension changes, and every rank agrees on which slots hold live KV: those the allocator has handed
out, which are the radix cache's once every request is parked there (`park_requests`). Rows of slots nobody uses
are not moved.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ft.kv_backup import BLOCK_TOKENS, StoreUnavailable, fetch_kv
from ft.planner import MigrationPlan
from sglang_ft.distributed.p2p import exchange, wait_all
from sglang_ft.mem_cache.kv_backup_stream import live_slots, rows_from_raw
from sglang_ft.sglang_surface import recreate_kv_buffers

KV_TAG_BASE = 1 << 16  # peer KV transfers' tags, apart from the weight transfers' (0..moves)


@dataclass
class KvRestoreStats:
    live_slots: int = 0
    heads_kept: int = 0
    bytes_p2p_in: int = 0
    blocks_restored: int = 0  # from the backup store (16 slots of one KV head, every layer)
    rows_missing: int = 0  # (head, slot) rows the store could not give: recomputed
    lacking: list = field(default_factory=list)  # slot numbers (tensors) of those rows


def reshape_kv_heads(pool, new_head_num: int) -> tuple[list, list]:
    """Give `pool` `new_head_num` heads per layer (fresh buffers, same slots); returns the old K and V buffers."""
    old = pool.k_buffer, pool.v_buffer
    recreate_kv_buffers(pool, new_head_num)
    return old


def _local(span, start: int, end: int) -> slice:
    return slice(start - span[0], end - span[0])


def put_rows(pool, slots: torch.Tensor, heads: slice, k_layers, v_layers) -> None:
    """Write per-layer rows ([n, heads, dim] each) into the pool at `slots` for local `heads`."""
    for layer, (k, v) in enumerate(zip(k_layers, v_layers, strict=True)):
        pool.k_buffer[layer][slots, heads] = k.to(pool.k_buffer[layer].device)
        pool.v_buffer[layer][slots, heads] = v.to(pool.v_buffer[layer].device)


def store_moves(plan: MigrationPlan, me: int) -> list:
    """The KV moves this rank fills from the backup store: the lost heads, and heads that were hybrid attention's
    remainder (their KV is spread over the old group by request, whole only in the store; the new layout's
    remainder heads are spread by request too: hybrid_attention.py)."""
    return [move for move in plan.moves if move.dim == "kv_heads" and (move.src is None or move.from_remainder)
            and move.dst == me and not move.to_remainder]


MISSED = object()  # `StorePrefetch.rows`: not asked for these slots (asked again then)


class StorePrefetch:
    """The backup store's rows for this rank's `store_moves`, asked for in a thread while the weights are
    resharded (the store is another process, the wait a socket's); `restore_kv` takes them if the live slots are
    still the ones asked for."""

    def __init__(self, moves: list, fetch: Callable[[tuple[int, int], torch.Tensor], object], slots: torch.Tensor):
        self.slots, self._rows = slots, {}
        self._thread = threading.Thread(target=self._fetch_all, args=(moves, fetch), name="ft-kv-prefetch",
                                        daemon=True)
        self._thread.start()

    def _fetch_all(self, moves, fetch) -> None:
        for move in moves:
            self._rows[move] = fetch((move.start, move.end), self.slots)

    def rows(self, move, slots: torch.Tensor):
        """What `fetch_rows` answered for `move`, or `MISSED` when the slots differ."""
        self._thread.join()
        if move not in self._rows or not torch.equal(slots, self.slots):
            return MISSED
        return self._rows[move]


def prefetch_store_rows(plan: MigrationPlan, me: int, epoch: int, endpoint: str | None, members, allocator,
                        dtype: torch.dtype) -> StorePrefetch | None:
    """Ask the backup store for this rank's `store_moves` at the live slots now, in the background (None: nothing
    to ask or no store)."""
    moves = store_moves(plan, me)
    if endpoint is None or not moves:
        return None
    fetch = lambda heads, slots: fetch_rows(endpoint, epoch, heads, slots, members, dtype)  # noqa: E731
    return StorePrefetch(moves, fetch, live_slots(allocator))


@torch.no_grad()
def restore_kv(pool, allocator, old_heads, new_heads, plan: MigrationPlan, me: int, epoch: int,
               fetch_endpoint: str | None, members: tuple[tuple[int, int], ...] = (), group=None,
               prefetched: StorePrefetch | None = None) -> KvRestoreStats:
    """Reshape `pool` from global KV heads `old_heads` (None: a restarted worker, holding none) to `new_heads`
    and fill the live slots of every head. `members` ((worker, pid) of the new group) go to the backup store.
    Moved heads travel over `group`, the new TP group's device group (None: torch's default), on the pool's
    device. `prefetched`: the store's rows asked for earlier (`StorePrefetch`)."""
    old_k, old_v = reshape_kv_heads(pool, new_heads[1] - new_heads[0])
    lo, hi = (max(old_heads[0], new_heads[0]), min(old_heads[1], new_heads[1])) if old_heads else (0, 0)
    stats = KvRestoreStats(heads_kept=max(0, hi - lo))
    slots = live_slots(allocator)
    stats.live_slots = len(slots)
    if not len(slots):
        return stats
    device_slots = slots.to(pool.k_buffer[0].device)
    if lo < hi:  # kept heads: only the live rows are copied (the pool is sized for the whole memory budget)
        kept_new, kept_old = _local(new_heads, lo, hi), _local(old_heads, lo, hi)
        put_rows(pool, device_slots, kept_new, [k[device_slots, kept_old] for k in old_k],
                  [v[device_slots, kept_old] for v in old_v])

    rank_of = {worker: rank for rank, worker in enumerate(plan.workers)}
    sends, recvs, landing = [], [], []
    for tag, move in enumerate(plan.moves):
        if move.dim != "kv_heads" or move.src is None or move.from_remainder or move.to_remainder:
            continue
        if move.src == me:
            heads = _local(old_heads, move.start, move.end)
            flat = torch.stack([torch.stack([k[device_slots, heads] for k in old_k]),
                                torch.stack([v[device_slots, heads] for v in old_v])]).contiguous()
            sends.append((rank_of[move.dst], KV_TAG_BASE + tag, flat))
        elif move.dst == me:
            shape = (2, len(old_k), len(slots), move.end - move.start, pool.head_dim)
            buffer = torch.empty(shape, dtype=pool.k_buffer[0].dtype, device=pool.k_buffer[0].device)
            recvs.append((rank_of[move.src], KV_TAG_BASE + tag, buffer))
            landing.append((buffer, move))
    requests = exchange(rank_of[me], sends, recvs, group)
    # Peer transfers are in flight; the backup store's rows meanwhile (asked for earlier where prefetched)
    for move in store_moves(plan, me):
        fetched = prefetched.rows(move, slots) if prefetched is not None else MISSED
        if fetched is MISSED:
            fetched = fetch_rows(fetch_endpoint, epoch, (move.start, move.end), slots, members, pool.k_buffer[0].dtype)
        _restore_from_store(pool, new_heads, move, slots, device_slots, fetched, stats)
    wait_all(requests)
    for buffer, move in landing:
        put_rows(pool, device_slots, _local(new_heads, move.start, move.end), buffer[0], buffer[1])
        stats.bytes_p2p_in += buffer.numel() * buffer.element_size()
    return stats


def fetch_rows(endpoint: str | None, epoch: int, heads, slots: torch.Tensor, members, dtype: torch.dtype):
    """Every layer's K and V rows of global `heads` at `slots` from the backup store, [layers, n, heads, dim]
    each, and which slots it had (numpy bool); None where there is no store or it does not answer."""
    if endpoint is None:
        return None
    try:
        k, v, found = fetch_kv(endpoint, epoch, tuple(heads), slots.numpy(), members=members)
    except StoreUnavailable:
        return None
    if not found.any():
        return None, None, found
    return (torch.stack([rows_from_raw(layer, dtype) for layer in k]),
            torch.stack([rows_from_raw(layer, dtype) for layer in v]), found)


def _restore_from_store(pool, new_heads, move, slots, device_slots, fetched, stats) -> None:
    """Put the store's rows of `move` (`fetch_rows`' answer) in the pool; count what it lacked."""
    heads = move.end - move.start
    if fetched is None:
        stats.rows_missing += heads * len(slots)
        stats.lacking.append(slots)
        return
    k, v, found = fetched
    stats.rows_missing += heads * int((~found).sum())
    stats.lacking.append(slots[~torch.as_tensor(np.array(found, dtype=bool))])
    if not found.any():
        return
    put_rows(pool, device_slots, _local(new_heads, move.start, move.end), k, v)
    stats.blocks_restored += heads * -(-int(found.sum()) // BLOCK_TOKENS)
