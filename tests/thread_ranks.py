"""TP ranks as threads over in-memory collectives, for units that run the same code on every rank."""

from __future__ import annotations

import threading


class ThreadGroup:
    """all_reduce (sum) and all_gather_object for `size` ranks that are threads; counts the collectives."""

    def __init__(self, size: int):
        self.size, self.slots, self.calls = size, [None] * size, 0
        self.barrier = threading.Barrier(size)

    def _exchange(self, rank: int, value) -> list:
        self.barrier.wait()
        self.slots[rank] = value
        if rank == 0:
            self.calls += 1
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone

    def all_reduce_for(self, rank: int):
        return lambda tensor: sum(self._exchange(rank, tensor.clone()))

    def gather_for(self, rank: int):
        return lambda obj: self._exchange(rank, obj)


def on_every_rank(size: int, step, timeout_s: float = 30.0) -> list:
    """`step(rank)` on `size` threads at once; their results in rank order (an exception names its rank)."""
    results, errors = [None] * size, []

    def one(rank):
        try:
            results[rank] = step(rank)
        except Exception as exc:  # surfaced below, with the rank
            errors.append((rank, exc))

    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not errors, errors
    return results
