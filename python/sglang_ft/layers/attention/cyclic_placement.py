"""Cyclic placement (`--ft-kv-placement cyclic`): a request's remainder KV rotates over the workers token by token.

Its new tokens start on the worker holding the fewest rows, so every worker stores the same rows to within a few
(one block of 16 at most on a mixed workload, `tests/unit/test_remainder_owners.py`); every worker attends over the rows
it holds and the partials are merged (`remainder_attention.py`). No owners, no copies: a cached prefix is used
wherever its rows are. (Rotating by token rather than by block of 16: the remainder pool maps rows one by one, so
nothing is gained by blocks, and blocks leave the workers up to several blocks apart while requests grow and
finish.) The holders' bookkeeping, the backup and the restore are hybrid attention's (`hybrid_attention.py`).
"""

from __future__ import annotations

import torch

from sglang_ft.layers.attention.hybrid_attention import RemainderPlacement, lowest_set_bits
from sglang_ft.layers.attention.remainder_attention import CyclicBatch, HeldSpan


class CyclicPlacement(RemainderPlacement):
    """`--ft-kv-placement cyclic`: the remainder KV of every request rotated over the workers token by token."""

    owns_requests = False

    @staticmethod
    def pool_rows(slots: int, workers: int) -> int:
        """Rows of a worker's remainder pool: its share of the slots plus 1/8 (the rotation keeps the workers
        within a few rows of each other); together the pools hold every slot, so SGLang's own admission by free
        slots is all the admission needed."""
        share = -(-slots // workers)
        return min(slots, share + -(-share // 8))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_of = torch.zeros(len(self.router.workers), dtype=torch.int64)  # remainder rows per worker

    def batch(self, forward_batch) -> CyclicBatch:
        """Place the batch's new tokens; return what this rank writes, attends over and projects."""
        if not forward_batch.forward_mode.is_extend() and (decode := self._decode_batch(forward_batch)) is not None:
            return decode
        counts = forward_batch.extend_seq_lens_cpu if forward_batch.forward_mode.is_extend() else \
            [1] * len(forward_batch.rids or [])
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        new_slots = forward_batch.out_cache_loc.cpu().to(torch.int64)
        device = forward_batch.out_cache_loc.device
        spans, start = [], 0
        for count, seq_len, pool_row in zip(counts, seq_lens, forward_batch.req_pool_indices.tolist(), strict=True):
            sequence = self.req_to_token[pool_row, :seq_len].cpu().to(torch.int64)
            self._place(sequence, seq_len - count)
            held = (self.holders[sequence] >> self.rank & 1).bool()
            spans.append(HeldSpan(start, count, seq_len - count, sequence[held].to(device),
                                  torch.arange(seq_len)[held].to(device)))
            start += count
        written = (self.holders[new_slots] >> self.rank & 1).bool().nonzero().flatten()
        return self._cyclic_batch(new_slots, written, spans, device)

    def _decode_batch(self, forward_batch) -> CyclicBatch | None:
        """A decode batch at once: each request's new token on the worker after its previous token's. None where
        that does not apply (a one-token sequence, a full pool): the batch is then placed request by request."""
        seq_lens = forward_batch.seq_lens_cpu.to(torch.int64)
        rows = forward_batch.req_pool_indices.cpu().to(torch.int64)
        new_slots = forward_batch.out_cache_loc.cpu().to(torch.int64)
        if not len(seq_lens) or int(seq_lens.min()) < 2:
            return None
        size, longest = len(self.router.workers), int(seq_lens.max())
        table = self.req_to_token[rows.to(self.req_to_token.device), :longest].cpu().to(torch.int64)
        previous = self.holders[table[torch.arange(len(rows)), seq_lens - 2]].to(torch.int64)
        if bool((previous == 0).any()):
            return None
        workers = (lowest_set_bits(previous) + 1) % size
        counts = torch.bincount(workers, minlength=size)
        if bool((self.rows_of + counts > self.capacity).any()):
            return None
        self.holders[new_slots] = (1 << workers).to(torch.int32)
        self.rows_of += counts
        valid = torch.arange(longest)[None, :] < seq_lens[:, None]
        held = valid & (self.holders[table] >> self.rank & 1).bool()
        device = forward_batch.out_cache_loc.device
        return self._cyclic_batch(new_slots, (workers == self.rank).nonzero().flatten(), [], device,
                                  decode_slots=table.to(device), decode_held=held.to(device))

    def _cyclic_batch(self, new_slots: torch.Tensor, written: torch.Tensor, spans: list[HeldSpan], device,
                      **decode) -> CyclicBatch:
        """What this rank does with a placed batch: write the new rows it holds (`written`: batch rows), attend,
        and project every size-th token from its rank on."""
        size = len(self.router.workers)
        self.written = new_slots[written].to(torch.int64)
        return CyclicBatch(self.pool, written.to(device), new_slots[written].to(device), spans,
                           torch.arange(len(new_slots), device=device)[self.rank :: size], self.rank, size,
                           self.all_reduce, **decode)

    def _place(self, sequence: torch.Tensor, prefix: int) -> None:
        """Holders for positions [prefix, len(sequence)), in turn over the workers from the one with the fewest rows
        (the lowest on a tie), whatever holds a cached prefix. So each request's new rows are spread evenly, to
        within a row, growing and freed as evenly, and the group stays within a few rows. (Going on from the
        holder of a cached prefix's last token instead sent every request sharing a system prompt to the same
        first worker: 30 rows apart on a server's mixed workload, more than a block.) A worker whose pool is full
        is passed over (every pool is sized for its share plus a margin, and together they hold every slot).
        Every rank decides the same, from the same holders."""
        size = len(self.router.workers)
        first = int(torch.argmin(self.rows_of))
        workers = (first + torch.arange(len(sequence) - prefix)) % size
        counts = torch.bincount(workers, minlength=size)
        if bool((self.rows_of + counts > self.capacity).any()):
            workers = self._around_full_pools(first, len(workers))
            counts = torch.bincount(workers, minlength=size)
        self.holders[sequence[prefix:]] = (1 << workers).to(torch.int32)
        self.rows_of += counts

    def _around_full_pools(self, first: int, n: int) -> torch.Tensor:
        """The rotation from `first`, skipping workers whose pools are full (a rare, slow path)."""
        size, rows, chosen, worker = len(self.router.workers), self.rows_of.clone(), [], first
        for _ in range(n):
            for _ in range(size):
                if rows[worker] < self.capacity:
                    break
                worker = (worker + 1) % size
            else:
                raise RuntimeError("sglang-ft: every worker's remainder KV pool is full")
            chosen.append(worker)
            rows[worker] += 1
            worker = (worker + 1) % size
        return torch.tensor(chosen, dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def release_slots(self, slots: torch.Tensor) -> None:
        slots = torch.unique(slots.to(torch.int64).cpu())
        bits = self.holders[slots]
        self.rows_of -= torch.stack([(bits >> w & 1).sum() for w in range(len(self.rows_of))])
        super().release_slots(slots)

    def take_moved(self, prefix: torch.Tensor, new: torch.Tensor, fetch) -> tuple[int, int]:
        """A moved request's `new` slots placed as a prefill after its cached `prefix` would be (see the parent)."""
        self._place(torch.cat([prefix, new]), len(prefix))
        return self._restore_held(new, fetch)

    def adopt(self, resumed, live: torch.Tensor, fetch) -> tuple[int, int]:
        """After a regroup: the cached slots' rows dealt over the workers in turn, in slot order (so each
        request's too, near enough), each worker fetching its share from the backup store."""
        live = live.to(torch.int64).cpu()
        size = len(self.router.workers)
        workers = torch.arange(len(live)) % size
        self.holders[live] = (1 << workers).to(torch.int32)
        self.rows_of = torch.bincount(workers, minlength=size)
        return self._fetch_held(live, fetch)
