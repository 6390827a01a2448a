"""The KV backup between steps: stage a step's rows into a host ring, hand them to the sender once copied, in order.

After a step's forward, `stage` starts the copy of the rows it wrote (every layer, one gather per layer over the
step's slots) into one of `RING_ENTRIES` host buffers (`kv_copy_engine`); `pump`, called after every step, hands
the sender every entry at the head of the queue whose copy completed. The queue is strictly first in, first out,
and drops of freed slots and request maps wait in it behind the writes staged before them: a drop never overtakes
an earlier write of its slot, and a later write (the slot reused) never overtakes the drop. Nothing blocks: with
every buffer in flight, a step's rows are not staged but dropped and counted, and in their place in the queue a
drop of exactly their slots tells the store not to trust whatever it held there (a lost drop in turn is a sequence
gap, which invalidates the worker's heads whole).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
RING_ENTRIES = 8  # host buffers in flight: a step stages one (two with remainder heads); the copy takes microseconds


def raw(tensor: torch.Tensor) -> np.ndarray:
    """A host tensor's bytes as an integer numpy array (bit-exact for any float dtype, no copy)."""
    return tensor.view(SIGNED[tensor.element_size()]).numpy()


class _Staged:
    """A step's rows of `heads` for `layers`, being copied into a ring buffer (`rows` [2, layers, n, heads, dim])."""

    def __init__(self, buffer, slots: torch.Tensor, rows: torch.Tensor, layers: list[int], heads, event,
                 moment: int):
        self.buffer, self.slots, self.rows, self.layers, self.heads, self.event = buffer, slots, rows, layers, heads, \
            event
        self.moment = moment  # when in the epoch the rows were written

    def ready(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    def messages(self) -> int:
        return len(self.layers)

    def send(self, sender) -> None:
        slots = raw(self.slots)
        for i, layer in enumerate(self.layers):
            sender.write(layer, slots, raw(self.rows[0, i]), raw(self.rows[1, i]), heads=self.heads,
                         moment=self.moment)


class _Message:
    """A message with nothing to copy (a drop, a request map, a write dropped on a full ring): sent in its turn."""

    buffer = None

    def __init__(self, send):
        self.send = send

    @staticmethod
    def ready() -> bool:
        return True

    @staticmethod
    def wait() -> None:
        return None

    @staticmethod
    def messages() -> int:
        return 1


class HostBuffer:
    """One ring entry: host memory for a step's rows [2, layers, rows, heads, dim] and their slot numbers."""

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None

    def views(self, engine, shape: tuple[int, ...], dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views for `n` rows of `shape` ([2, layers, heads, dim]), growing the buffers (powers of two) to fit."""
        rows = self.rows
        if rows is None or rows.dtype != dtype or rows.shape[:2] != shape[:2] or rows.shape[3:] != shape[2:] \
                or rows.shape[2] < n:
            grown = 1 << max(n - 1, 0).bit_length()
            self.rows = engine.host_buffer((*shape[:2], grown, *shape[2:]), dtype)
        if self.slots is None or self.slots.numel() < n:
            self.slots = engine.host_buffer((self.rows.shape[2],), torch.int64)
        return self.rows[:, :, :n], self.slots[:n]


class HostRing:
    """`entries` reusable host buffers (pinned on CUDA), each grown to the largest step it carried."""

    def __init__(self, engine, entries: int = RING_ENTRIES):
        self.engine = engine
        self.free = [HostBuffer() for _ in range(entries)]

    def take(self) -> HostBuffer | None:
        """A free buffer, or None when every one is in flight."""
        return self.free.pop() if self.free else None

    def give_back(self, buffer: HostBuffer) -> None:
        self.free.append(buffer)


class BackupPipeline:
    """The ordered queue between the steps and the sender (`ft.kv_backup.KvBackupSender`)."""

    def __init__(self, sender, engine, entries: int = RING_ENTRIES):
        self.sender = sender
        self.engine = engine
        self.ring = HostRing(engine, entries)
        self.pending: deque = deque()
        self._queued = 0  # messages in `pending` (read by the heartbeat thread: a count, not a walk of the deque)
        self.staging_dropped = 0  # steps' rows not staged for a full ring (their slots dropped from the store)
        self.messages_dropped = 0  # the messages (one per layer) those would have been

    def stage(self, layers: list[int], heads: tuple[int, int], slots: torch.Tensor, index: torch.Tensor,
              k_sources: list[torch.Tensor], v_sources: list[torch.Tensor], moment: int = 0) -> bool:
        """Start copying `k_sources[i][index]` and `v_sources[i][index]` (the rows of `slots`, [n, heads, dim],
        written at `moment` of the epoch) for each of `layers`; False when the ring was full (the store is told to
        drop those slots instead)."""
        buffer = self.ring.take()
        if buffer is None:
            self.staging_dropped += 1
            self.messages_dropped += len(layers)
            lost = slots.to("cpu", torch.int64).numpy()  # a full ring is rare: a host copy of the slots is fine
            after = moment + 1  # just after the rows were written: whatever the store holds is older
            self._append(_Message(lambda sender: sender.drop(lost, heads=heads, moment=after)))
            return False
        first = k_sources[0]
        rows, host_slots = buffer.views(self.engine, (2, len(layers), *first.shape[1:]), first.dtype, len(index))
        copies = [(host_slots, slots.to(torch.int64), None)]
        for i, (k, v) in enumerate(zip(k_sources, v_sources, strict=True)):
            copies += [(rows[0, i], k, index), (rows[1, i], v, index)]
        self._append(_Staged(buffer, host_slots, rows, list(layers), heads, self.engine.start(copies), moment))
        return True

    def send_in_turn(self, send) -> None:
        """Queue a message with nothing to copy (`send(sender)`), behind everything staged before it."""
        self._append(_Message(send))
        self.pump()

    def _append(self, entry) -> None:
        self.pending.append(entry)
        self._queued += entry.messages()

    def pump(self) -> int:
        """Hand the sender every entry at the head of the queue whose copy completed; returns the entries sent."""
        sent = 0
        while self.pending and self.pending[0].ready():
            entry = self.pending.popleft()
            self._queued -= entry.messages()
            entry.send(self.sender)
            if entry.buffer is not None:
                self.ring.give_back(entry.buffer)
            sent += 1
        return sent

    def flush(self) -> None:
        """Wait for every copy in flight and hand everything over (outside a step: a regroup, a resync)."""
        for entry in self.pending:
            entry.wait()
        self.pump()

    def queued(self) -> int:
        """Messages staged or waiting in the queue, not yet handed to the sender."""
        return self._queued
