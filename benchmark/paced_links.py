"""Links of one bandwidth each, independent of each other, for the reshard benchmark on a machine whose links are not.

On this 2-core machine every "link" of the transfer schedule (a worker's inbound and outbound peer traffic, its
checkpoint reads) is a memory copy on the same two cores, so the schedule's model (independent links, the time of
the busiest) does not describe the host, whatever the executor does. `PacedLinks` makes it describe it: each
transfer and each disk read still runs for real (gloo, safetensors), and also holds its links for its bytes over
`bps` on one clock every process shares, finishing no sooner than that. With `bps` far below what the cores copy,
the links, not the cores, decide the time, as NVLink pairs and a drive per reader do on a GPU host. What it measures
is the executor: whether it keeps every link busy in the schedule's order (overlapping peer moves, disk reads and
the kept slices' copies) or leaves gaps; the hardware's bandwidths are not in it.

A transfer is reserved by whichever end posts it first (both ends post in the schedule's issue order, at about the
same time) on the sender's outbound and the receiver's inbound link, from when both are free.
"""

from __future__ import annotations

import itertools
import time


class PacedRequest:
    """A transfer's request that completes when the real transfer has and its links' time is over."""

    def __init__(self, real, end: float):
        self.real, self.end = real, end

    def is_completed(self) -> bool:
        return self.real.is_completed() and time.monotonic() >= self.end

    def wait(self, timeout=None) -> bool:
        self.real.wait() if timeout is None else self.real.wait(timeout)
        _sleep_until(self.end)
        return True


def _sleep_until(end: float, between=None, step_s: float = 0.005) -> None:
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, step_s))
        if between is not None:
            between()


class PacedLinks:
    """The links' clock: `shared` a dict and `lock` a lock every process sees (a multiprocessing manager's)."""

    def __init__(self, bps: float, shared, lock, me: int):
        self.bps, self.shared, self.lock, self.me = bps, shared, lock, me
        self.round = 0  # one per reshard, so a tag names one transfer
        self._reads = itertools.count()

    def reserve(self, key, links: list, nbytes: int) -> float:
        """When the transfer `key` ends: reserved once for both ends, from when all its `links` are free."""
        with self.lock:
            if key in self.shared:
                return self.shared[key]
            start = max([time.monotonic()] + [self.shared.get(link, 0.0) for link in links])
            end = start + nbytes / self.bps
            for link in links:
                self.shared[link] = end
            self.shared[key] = end
            return end

    def install(self) -> None:
        """Pace this process's peer transfers and checkpoint reads (the reshard's, through the names it calls)."""
        from sglang_ft.distributed import p2p
        from sglang_ft.elastic_tp import reshard
        from sglang_ft.model_loader import weight_cache

        real_send, real_receive, real_read = p2p.send, p2p.receive, weight_cache.read_slices

        def send(peer, tag, tensor, group):
            end = self.reserve(("move", self.round, tag), [("out", self.me), ("in", peer)], _nbytes(tensor))
            return PacedRequest(real_send(peer, tag, tensor, group), end)

        def receive(peer, tag, tensor, group):
            end = self.reserve(("move", self.round, tag), [("out", peer), ("in", self.me)], _nbytes(tensor))
            return PacedRequest(real_receive(peer, tag, tensor, group), end)

        def read_slices(checkpoint_dir, pieces, cache_dir=None, between_tensors=None):
            nbytes = sum(_nbytes(piece.view) for piece in pieces)
            end = self.reserve(("read", self.me, next(self._reads)), [("disk", self.me)], nbytes)
            result = real_read(checkpoint_dir, pieces, cache_dir, between_tensors)
            _sleep_until(end, between_tensors)  # peer buffers keep landing while the read's time runs out
            return result

        p2p.send, p2p.receive, reshard.send, reshard.receive = send, receive, send, receive
        weight_cache.read_slices = read_slices


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()
