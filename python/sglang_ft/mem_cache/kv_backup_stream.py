"""Stream the KV a scheduler writes to the node's backup store, between steps, never inside the forward pass.

After each step (`after_step`, from the scheduler's `run_batch` hook) the rows that step wrote (this rank's KV heads
at the step's token slots, every layer, and the remainder heads' rows it holds under hybrid attention or cyclic
placement) are copied to host memory without blocking the step and handed to a non-blocking ZMQ queue
(`ft.kv_backup.KvBackupSender`) once the copy completed (`kv_backup_pipeline`, `kv_copy_engine`). Freed slots
(finished requests not cached, radix-cache evictions, a flush) are dropped from the store, in order behind the
writes before them.

What the store holds: every step's rows once the worker that wrote them handed them over, which is at the end of
the step on the CPU and at the next step (or regroup) on CUDA; a worker killed during a step, or between its end
and the hand-over, takes that step's rows with it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ft.kv_backup import Geometry, KvBackupSender
from sglang_ft.mem_cache.kv_backup_pipeline import SIGNED, BackupPipeline
from sglang_ft.mem_cache.kv_copy_engine import copy_engine_for

RESYNC_SLOTS_PER_MESSAGE = 4096


def raw_rows(tensor: torch.Tensor) -> np.ndarray:
    """`tensor`'s bytes as an integer numpy array on the host (bit-exact for any float dtype)."""
    tensor = tensor.detach().contiguous()
    return tensor.view(SIGNED[tensor.element_size()]).cpu().numpy()


def rows_from_raw(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `raw_rows` (on the host)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.ascontiguousarray(array).view(f"i{itemsize}")).view(dtype)


def slots_in_use(allocator) -> torch.Tensor:
    """A bool per token slot (on the host): has the allocator handed it out? (SGLang's padding slot 0: no.)"""
    in_use = torch.ones(allocator.size + allocator.page_size, dtype=torch.bool)
    in_use[0] = False
    for free in (allocator.free_pages, allocator.release_pages):
        if free.numel():
            in_use[free.to("cpu", torch.int64)] = False
    return in_use


def live_slots(allocator) -> torch.Tensor:
    """Every token slot the allocator has handed out, sorted (the same on every rank)."""
    return torch.nonzero(slots_in_use(allocator)).flatten()


class KvStreamer:
    """This rank's side of the KV backup: which pool and allocator to follow, and its heads."""

    def __init__(self, endpoint: str, worker: int, queue_messages: int, pool, allocator, num_kv_heads_total: int,
                 engine=None):
        self.sender = KvBackupSender(endpoint, worker, queue_messages)
        if engine is None:
            engine = copy_engine_for(pool.k_buffer[0].device if pool is not None else "cpu")
        self.pipeline = BackupPipeline(self.sender, engine)
        self.pool = pool
        self.allocator = allocator
        self.num_kv_heads_total = num_kv_heads_total
        self.drops_muted = False
        # Steps that wrote KV in this epoch, the same count on every rank of the group (their schedulers run the
        # same steps), and from it when each message happens: 2j for step j's rows, 2j + 1 for slots freed after
        # step j, 2j + 2 for rows written between steps j and j + 1 (as new as step j + 1's). Several workers write
        # one head's rows under hybrid attention and cyclic placement, over separate sockets the store reads in no
        # set order: it orders their writes and drops of a slot by (epoch, moment), not by arrival (`ft.kv_store`).
        self.steps = 0

    @contextlib.contextmanager
    def muting_drops(self):
        """While the caller rebuilds the allocator itself (and drops what it really freed afterwards): SGLang's radix
        insert frees a key's "duplicate" slots, which during a rebuild are the very slots the tree keeps."""
        self.drops_muted = True
        try:
            yield
        finally:
            self.drops_muted = False

    def follow(self, pool, heads: tuple[int, int], epoch: int) -> None:
        """Stream `pool` (after a regroup reshaped it) for global KV heads `heads` at `epoch`; whatever the older pool
        staged goes first, with the older heads and epoch."""
        self.pipeline.flush()
        self.pool = pool
        self.sender.heads = tuple(heads)
        self.sender.epoch = epoch
        self.steps = 0
        self.sender.geometry = Geometry(
            num_layers=pool.layer_num,
            num_kv_heads=self.num_kv_heads_total,
            head_dim=pool.head_dim,
            slots=int(pool.k_buffer[0].shape[0]),
            itemsize=pool.k_buffer[0].element_size(),
        )

    def after_step(self, batch, placement=None) -> None:
        """Between steps: start copying the rows `batch`'s forward wrote (this rank's heads at its slots, every layer;
        the remainder rows this rank wrote, under hybrid attention or cyclic placement) and hand the sender every
        earlier copy that completed. Never waits for a copy."""
        self.pipeline.pump()
        slots = getattr(batch, "out_cache_loc", None)
        mode = batch.forward_mode
        if self.sender.geometry is not None and slots is not None and slots.numel() \
                and (mode.is_extend() or mode.is_decode()):
            self.steps += 1
            pool, index = self.pool, slots.to(torch.int64)
            layers = range(pool.start_layer, pool.start_layer + len(pool.k_buffer))
            self.pipeline.stage(layers, self.sender.heads, index, index, pool.k_buffer, pool.v_buffer,
                                self.step_rows())
            if placement is not None:
                self._stage_remainder(placement)
        self.pipeline.pump()

    def _stage_remainder(self, placement) -> None:
        written = placement.take_written()
        if written is None or not len(written):
            return
        pool = placement.pool
        local = pool.local_of[written.to(pool.local_of.device)]
        self.pipeline.stage(range(pool.k.shape[0]), placement.heads, written, local, list(pool.k), list(pool.v),
                            self.step_rows())

    def _write_layer(self, index: int, slots: torch.Tensor) -> bool:
        """Send the pool's rows of `slots` in layer `index` (this rank's heads), at once (outside a step)."""
        pool = self.pool
        return self.sender.write(index + pool.start_layer, raw_rows(slots), raw_rows(pool.k_buffer[index][slots]),
                                 raw_rows(pool.v_buffer[index][slots]), moment=self.between_steps())

    def step_rows(self) -> int:
        """The moment of the latest step's rows."""
        return 2 * self.steps

    def freed(self) -> int:
        """The moment of slots freed now: after the latest step's rows."""
        return 2 * self.steps + 1

    def between_steps(self) -> int:
        """The moment of rows written outside a step: as new as the next step's (they can be of slots freed since
        the last step)."""
        return 2 * self.steps + 2

    def write_rows(self, layer_id: int, heads: tuple[int, int], slots: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Back up rows kept outside SGLang's pool and written outside a step (a restarted store's resync, a moved
        request's rows): hybrid attention's remainder heads, [n, heads, dim]; after everything staged before."""
        if self.sender.geometry is not None and slots.numel():
            self.pipeline.flush()
            self.sender.write(layer_id, raw_rows(slots), raw_rows(k), raw_rows(v), heads=heads,
                              moment=self.between_steps())

    def drop_rows(self, heads: tuple[int, int], slots: torch.Tensor) -> None:
        if not self.drops_muted and self.sender.geometry is not None and slots.numel():
            self._drop_in_turn(raw_rows(slots.to(torch.int64)), heads)

    def on_slots_freed(self, allocator, slots: torch.Tensor) -> None:
        if allocator is self.allocator and not self.drops_muted and self.sender.geometry is not None and slots.numel():
            self._drop_in_turn(raw_rows(slots.to(torch.int64)))

    def on_allocator_cleared(self, allocator) -> None:
        if allocator is self.allocator and not self.drops_muted and self.sender.geometry is not None:
            self._drop_in_turn(np.arange(self.sender.geometry.slots, dtype=np.int64))

    def _drop_in_turn(self, slots: np.ndarray, heads: tuple[int, int] | None = None) -> None:
        """Drop `slots` from the store (for this rank's heads, or `heads`) after every write staged before: a write
        of a slot freed since must not land after its drop. (The queue is flushed before the heads change.)"""
        moment = self.freed()  # now, not when its turn comes
        self.pipeline.send_in_turn(lambda sender: sender.drop(slots, heads=heads, moment=moment))

    def counters(self) -> tuple[int, int, int, int]:
        """What heartbeats carry: messages sent, dropped (a full ZMQ queue, or a step's rows on a full staging ring,
        one per layer), bytes sent, and messages not yet written to the store (staged ones included)."""
        sent, dropped, nbytes, queued = self.sender.counters()
        return sent, dropped + self.pipeline.messages_dropped, nbytes, queued + self.pipeline.queued()

    def back_up_slots(self, slots: torch.Tensor) -> int:
        """Send the pool's rows of `slots`, every layer, for this rank's heads (rows written outside the forward
        pass); returns the messages sent."""
        if self.sender.geometry is None:
            return 0
        self.pipeline.flush()
        slots = slots.to(self.pool.k_buffer[0].device)
        sent = 0
        for start in range(0, len(slots), RESYNC_SLOTS_PER_MESSAGE):
            chunk = slots[start : start + RESYNC_SLOTS_PER_MESSAGE]
            sent += sum(self._write_layer(index, chunk) for index in range(len(self.pool.k_buffer)))
        return sent

    def resync(self) -> tuple[int, int]:
        """Re-send every slot in use, for this rank's heads (after the store restarted); returns (slots, sent)."""
        if self.sender.geometry is None:
            return 0, 0
        slots = live_slots(self.allocator)
        return len(slots), self.back_up_slots(slots)

    def map_requests(self, batch) -> bool:
        """After a step on TP rank 0: tell the store which slots hold the tokens it wrote, per request (a prefill
        or mixed step: each request's whole row, so a request prefilled again is mapped afresh; a decode step: the
        one new slot of each), so another replica can take them over (ft.request_slots)."""
        mode = batch.forward_mode
        if self.sender.geometry is None or not batch.reqs or not (mode.is_extend() or mode.is_decode()):
            return False
        lengths = batch.seq_lens_cpu.tolist()
        rids = [req.rid for req in batch.reqs]
        if mode.is_decode():
            starts, counts, slots = [n - 1 for n in lengths], [1] * len(rids), batch.out_cache_loc
        else:
            rows = batch.req_to_token_pool.req_to_token
            starts, counts = [0] * len(rids), lengths
            slots = torch.cat([rows[req.kv.req_pool_idx, :n] for req, n in zip(batch.reqs, lengths, strict=True)])
        slots = raw_rows(slots.to(torch.int64))
        self.pipeline.send_in_turn(lambda sender: sender.request_slots(rids, starts, counts, slots))
        return True
