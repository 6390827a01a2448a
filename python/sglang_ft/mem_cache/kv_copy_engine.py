"""Device-to-host copies of a step's KV rows that never block the step: the device side of the KV backup.

One interface, two engines. On CUDA (`StreamCopyEngine`) the rows are gathered on the compute stream (ordered after
the forward that wrote them and before any later write of the same slots), then copied into pinned host buffers on
a dedicated copy stream, and an event recorded there says when the host has them: the scheduler's thread never
waits. On the CPU (`SyncCopyEngine`) the gather writes the host buffer directly and is done when it returns. The
stream, event and stream-context factories are arguments, so tests drive the CUDA engine with fakes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


class Done:
    """The event of a copy that completed when it was started (CPU)."""

    @staticmethod
    def query() -> bool:
        return True

    @staticmethod
    def synchronize() -> None:
        return None


class SyncCopyEngine:
    """The CPU: gathers write the host buffers synchronously."""

    def host_buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def start(self, copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        """For each (host destination, source, index or None): destination = source[index]; returns the event."""
        for dst, src, index in copies:
            if index is None:
                dst.copy_(src)
            else:
                torch.index_select(src, 0, index, out=dst)
        return Done()


class StreamCopyEngine:
    """CUDA: gather on the compute stream, copy to pinned host memory on a copy stream, an event per copy."""

    def __init__(self, stream, current_stream: Callable[[], object], make_event: Callable[[], object],
                 use_stream: Callable[[object], contextlib.AbstractContextManager], pin_memory: bool = True):
        self.stream = stream
        self.current_stream = current_stream
        self.make_event = make_event
        self.use_stream = use_stream
        self.pin_memory = pin_memory

    def host_buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)

    def start(self, copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        """Start the copies; returns the event recorded after them on the copy stream. The gathered device rows
        stay referenced by the event until it completes (the caching allocator must not reuse them earlier)."""
        gathered = [(dst, src if index is None else src.index_select(0, index))  # on the compute stream
                    for dst, src, index in copies]
        self.stream.wait_stream(self.current_stream())
        with self.use_stream(self.stream):
            for dst, rows in gathered:
                dst.copy_(rows, non_blocking=True)
            event = self.make_event()
            event.record(self.stream)
        return _Keeping(event, gathered)


class _Keeping:
    """An event and the device tensors its copies read (released with it, once it completed)."""

    def __init__(self, event, keep):
        self.event, self.keep = event, keep

    def query(self) -> bool:
        return bool(self.event.query())

    def synchronize(self) -> None:
        self.event.synchronize()


def copy_engine_for(device) -> SyncCopyEngine | StreamCopyEngine:
    """The engine for a KV pool on `device`."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        device = torch.device(device)
        return StreamCopyEngine(torch.cuda.Stream(device=device), lambda: torch.cuda.current_stream(device),
                                torch.cuda.Event, torch.cuda.stream, pin_memory=True)
    return SyncCopyEngine()
