"""Hybrid attention's placement in the scheduler: each request's remainder heads whole on one owner.

Every TP rank runs the same scheduler on the same requests, so each keeps the same `RemainderPlacement`: owners
chosen by `ft.remainder_routing` when a request is first matched against the radix cache, and for every token slot
the set of workers holding its remainder KV (`holders`, a bit per worker, written by each forward). Only holders
keep those rows, in their `RemainderKvPool`. A request reusing a cached prefix whose rows its owner lacks (a shared
system prompt first computed elsewhere) gets them from a holder in its prefill: one all-reduce per batch that needs
any, after which the owner holds a copy too, so the radix cache is reused whole whoever owns the request.
The other placement, per token, is `cyclic_placement.py`; `remainder_placement.py` installs the one configured.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ft.remainder_routing import RequestRouter
from sglang_ft.layers.attention.remainder_attention import OwnedSpan, RemainderBatch, RemainderKvPool
from sglang_ft.mem_cache.kv_backup_stream import RESYNC_SLOTS_PER_MESSAGE

ADOPT_BLOCK_SLOTS = 16  # cached slots no resumed request uses are spread over the workers in blocks of this size


class RemainderPlacement:
    owns_requests = True  # each request's remainder heads on one owner (hybrid attention)
    keeping = False  # inside `keeping_slots`: SGLang's frees are a rebuild's, not real

    @staticmethod
    def pool_rows(slots: int, workers: int) -> int:
        """Rows of a worker's remainder pool: every slot (one owner may come to hold most requests' rows; sizing
        it to a share needs admission by the owner's free rows, not built)."""
        return slots

    def __init__(self, rank: int, tp_size: int, policy: str, pool: RemainderKvPool, req_to_token: torch.Tensor,
                 heads: tuple[int, int] = (0, 0), stream=None, all_reduce=None):
        if tp_size > 31:
            raise ValueError("hybrid attention keeps a bit per worker: at most 31 workers")
        self.rank = rank
        self.heads = heads  # the global KV heads of the remainder
        self.stream = stream  # the KV backup stream (kv_backup_stream.KvStreamer), if on
        if all_reduce is None:
            from sglang_ft.layers.elastic_parallel import all_reduce
        self.all_reduce = all_reduce  # the sum over the TP group
        self.router = RequestRouter(tuple(range(tp_size)), policy)
        self.pool = pool
        self.req_to_token = req_to_token  # SGLang's [request row, position] -> token slot
        self.holders = torch.zeros(pool.local_of.numel(), dtype=torch.int32)
        self.rows_copied = 0  # remainder KV rows received from another worker (prefix reuse across owners)
        self.written: torch.Tensor | None = None  # slots whose remainder rows this rank wrote in the latest step
        self.lacking = torch.empty(0, dtype=torch.int64)  # slots whose rows the last fetch from the store lacked

    def owner_of(self, rid: str, tokens: int, prefix_slots: torch.Tensor | None = None) -> int:
        """The request's owner, chosen now if it has none; `prefix_owner` is the least loaded worker holding the
        whole cached prefix (the deepest slot's holders hold the rest of its path too, unless it was copied)."""
        owner = self.router.owner_of.get(rid)
        if owner is not None:
            return owner
        prefix_owner = None
        if prefix_slots is not None and len(prefix_slots):
            bits = int(self.holders[prefix_slots[-1]])
            candidates = [w for w in self.router.workers if bits >> w & 1]
            if candidates:
                loads = self.router.load()
                prefix_owner = min(candidates, key=lambda w: (loads[w], w))
        return self.router.admit(rid, tokens, prefix_owner)

    def batch(self, forward_batch) -> RemainderBatch:
        """Record which worker holds the KV each token of this batch writes, bring owners the earlier tokens' rows
        they lack, and return the rows and spans this rank owns."""
        rids = forward_batch.rids or []
        counts = forward_batch.extend_seq_lens_cpu if forward_batch.forward_mode.is_extend() else [1] * len(rids)
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        pool_rows = forward_batch.req_pool_indices.cpu()
        new_slots = forward_batch.out_cache_loc.cpu()
        owners = [self.owner_of(rid, seq_len) for rid, seq_len in zip(rids, seq_lens, strict=True)]
        self._bring_earlier_rows(pool_rows, owners, [n - c for n, c in zip(seq_lens, counts, strict=True)])
        rows, spans, start, owned = [], [], 0, 0
        for owner, count, seq_len, pool_row in zip(owners, counts, seq_lens, pool_rows.tolist(), strict=True):
            self.holders[new_slots[start : start + count]] = 1 << owner
            if owner == self.rank:
                spans.append(OwnedSpan(owned, count, self.req_to_token[pool_row, :seq_len].to(torch.int64)))
                rows.append(torch.arange(start, start + count))
                owned += count
            start += count
        device = forward_batch.out_cache_loc.device
        rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
        self.written = new_slots[rows].to(torch.int64)
        rows = rows.to(device)
        return RemainderBatch(self.pool, rows, forward_batch.out_cache_loc[rows].to(torch.int64), spans)

    def _bring_earlier_rows(self, pool_rows: torch.Tensor, owners: list[int], earlier: list[int]) -> None:
        """Tokens before this step whose rows the owner lacks: a cached prefix computed on another worker, or
        slots SGLang's radix cache swapped in for a duplicate of a prefix another request wrote."""
        width = max(earlier, default=0)
        if not width:
            return
        table = self.req_to_token[pool_rows.to(self.req_to_token.device), :width].cpu().to(torch.int64)
        valid = torch.arange(width)[None, :] < torch.tensor(earlier)[:, None]
        bits = self.holders[torch.where(valid, table, 0)]
        lacking = valid & ((bits >> torch.tensor(owners)[:, None]) & 1 == 0)
        wanted = [(owner, table[i][lacking[i]]) for i, owner in enumerate(owners) if bool(lacking[i].any())]
        if wanted:
            self._copy_rows(wanted)

    def _copy_rows(self, wanted: list[tuple[int, torch.Tensor]]) -> None:
        """Give each owner the remainder rows of `wanted` slots from their lowest holder: every rank puts in the
        rows it is the source of, zeros elsewhere, and one all-reduce delivers them (every rank knows the plan)."""
        owners = torch.cat([torch.full((len(s),), o, dtype=torch.int64) for o, s in wanted])
        slots = torch.cat([s for _, s in wanted])
        key = torch.unique(owners * self.holders.numel() + slots)  # a slot two requests of one owner lack: once
        owners, slots = key // self.holders.numel(), key % self.holders.numel()
        bits = self.holders[slots]
        if bool((bits == 0).any()):
            raise RuntimeError("sglang-ft: a cached slot has no holder of its remainder heads' KV")
        sources = lowest_set_bits(bits)
        layers, _, heads, head_dim = self.pool.k.shape
        buffer = torch.zeros((2, layers, len(slots), heads, head_dim), dtype=self.pool.k.dtype,
                             device=self.pool.k.device)
        mine = (sources == self.rank).nonzero().flatten()
        if len(mine):
            buffer[0][:, mine.to(buffer.device)], buffer[1][:, mine.to(buffer.device)] = self.pool.rows(slots[mine])
        buffer = self.all_reduce(buffer)
        for_me = (owners == self.rank).nonzero().flatten()
        if len(for_me):
            index = for_me.to(buffer.device)
            self.pool.put_rows(slots[for_me], buffer[0][:, index], buffer[1][:, index])
        self.holders[slots] |= (1 << owners).to(torch.int32)
        self.rows_copied += len(for_me)

    def take_written(self) -> torch.Tensor | None:
        """The slots (on the host) whose remainder rows this rank wrote in the step just run, once: the backup
        copies them after the step (kv_backup_stream.after_step), never from inside the forward pass."""
        written, self.written = self.written, None
        return written

    def resync(self) -> int:
        """Re-send every remainder row this worker holds to a restarted backup store; returns the messages."""
        return self._back_up((self.holders >> self.rank & 1).nonzero().flatten())

    def _back_up(self, slots: torch.Tensor) -> int:
        """Send this worker's remainder rows of `slots` (all held here) to the backup store; returns the messages."""
        if self.stream is None:
            return 0
        for start in range(0, len(slots), RESYNC_SLOTS_PER_MESSAGE):
            chunk = slots[start : start + RESYNC_SLOTS_PER_MESSAGE]
            k, v = self.pool.rows(chunk)
            for layer in range(k.shape[0]):
                self.stream.write_rows(layer, self.heads, chunk, k[layer], v[layer])
        return -(-len(slots) // RESYNC_SLOTS_PER_MESSAGE) * self.pool.k.shape[0]

    def take_moved(self, prefix: torch.Tensor, new: torch.Tensor, fetch) -> tuple[int, int]:
        """A request moved here from a lost replica (replica_kv.py): `prefix` slots it finds cached here, then `new`
        slots for the tokens whose KV comes from the lost replica's store. Their remainder rows go whole to one
        worker, the one holding the prefix's (or the least loaded), which its match then makes its owner; each
        worker fetches what it holds (`fetch(heads, new slots)`); returns (rows restored here, rows missing)."""
        worker = lowest_bit(int(self.holders[prefix[-1]])) if len(prefix) else None
        if worker is None:
            loads = self.router.load()
            worker = min(self.router.workers, key=lambda w: (loads[w], w))
        self.holders[new] = 1 << worker
        return self._restore_held(new, fetch)

    def _restore_held(self, new: torch.Tensor, fetch) -> tuple[int, int]:
        restored, missing = self._fetch_held(new, fetch)
        if not missing:  # rows written outside a forward: backed up here (the regroup's are in the store already)
            self._back_up(new[(self.holders[new] >> self.rank & 1) == 1])
        return restored, missing

    @contextlib.contextmanager
    def keeping_slots(self):
        """While a rebuild of SGLang's radix cache re-inserts the slots it keeps (SGLang's insert "frees" a key's
        duplicate slots): the free hook's releases are ignored; the caller releases what it really freed."""
        self.keeping = True
        try:
            yield
        finally:
            self.keeping = False

    def freed_by_sglang(self, slots: torch.Tensor) -> None:
        """SGLang's allocator freed `slots` (its free hook): release their rows, unless a rebuild keeps them."""
        if not self.keeping:
            self.release_slots(slots)

    def release_slots(self, slots: torch.Tensor) -> None:
        slots = slots.to(torch.int64).cpu()
        if self.stream is not None and bool((self.holders[slots] >> self.rank & 1).any()):
            self.stream.drop_rows(self.heads, slots)
        self.holders[slots] = 0
        self.pool.release(slots)

    def adopt(self, resumed, live: torch.Tensor, fetch) -> tuple[int, int]:
        """After a regroup formed this group, spread the cached slots' remainder rows evenly: each resumed
        request's cached prefix (`resumed`: `scheduler_sync.CachedSequence`s in queue order) goes whole to the
        worker holding the fewest rows so far, which becomes its owner; the other cached slots follow in blocks.
        Each worker fetches its rows from the backup store (`fetch(heads, slots)` -> (k, v, found) or None);
        returns the rows this one restored and those it could not get."""
        rows = dict.fromkeys(self.router.workers, 0)

        def place(slots: torch.Tensor) -> int:
            worker = min(self.router.workers, key=lambda w: (rows[w], w))
            free = slots[self.holders[slots] == 0]
            self.holders[free] = 1 << worker
            rows[worker] += len(free)
            return worker

        for seq in resumed:
            owner = place(torch.as_tensor(seq.slots, dtype=torch.int64))
            self.router.assign(seq.rid, seq.prompt_len + seq.max_new_tokens, owner)
        live = live.to(torch.int64).cpu()
        rest = live[self.holders[live] == 0]
        for start in range(0, len(rest), ADOPT_BLOCK_SLOTS):
            place(rest[start : start + ADOPT_BLOCK_SLOTS])
        return self._fetch_held(live, fetch)

    def _fetch_held(self, live: torch.Tensor, fetch) -> tuple[int, int]:
        """Fetch the rows of the `live` slots placed on this worker from the backup store."""
        mine = live[(self.holders[live] >> self.rank & 1) == 1]
        self.lacking = mine
        if not len(mine):
            return 0, 0
        fetched = fetch(self.heads, mine)
        if fetched is None:
            return 0, len(mine)
        k, v, found = fetched
        found = torch.as_tensor(np.array(found, dtype=bool))
        self.lacking = mine[~found]
        if k is not None:
            device = self.pool.k.device
            self.pool.put_rows(mine[found], k[:, found].to(device), v[:, found].to(device))
        return int(found.sum()), int((~found).sum())

    def clear(self) -> None:
        self.release_slots(torch.arange(self.holders.numel()))

    def finished(self, reqs) -> None:
        for req in reqs:
            if req.finished():
                self.router.release(req.rid)

    def aborted_before_running(self, req) -> None:
        """SGLang dropped a queued request (a client abort, a full queue, a lower priority): it will not stream
        a finish, so its owner's load is released here. A request holding KV still runs a last (aborted) forward
        and is released when that finish streams."""
        if not req.kv.holds_kv:
            self.router.release(req.rid)


def lowest_bit(bits: int) -> int | None:
    return (bits & -bits).bit_length() - 1 if bits else None


def lowest_set_bits(bits: torch.Tensor) -> torch.Tensor:
    """The lowest worker in each holder bitmask (none may be 0)."""
    bits = bits.to(torch.int64)
    return torch.log2((bits & -bits).double()).long()
