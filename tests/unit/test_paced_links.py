"""The reshard benchmark's paced links (benchmark/paced_links.py): a link carries one transfer at a time at its
bandwidth, links do not share, both ends of a transfer see the same end, and a paced request completes only after
both its real transfer and its links' time."""

from __future__ import annotations

import threading
import time

from benchmark.paced_links import PacedLinks, PacedRequest

BPS = 1000.0  # bytes per second: 100 bytes hold a link 0.1 s


def links() -> PacedLinks:
    return PacedLinks(BPS, {}, threading.Lock(), me=0)


def test_transfers_sharing_a_link_follow_each_other_and_others_run_beside_them():
    clock, now = links(), time.monotonic()
    first = clock.reserve(("move", 1, 0), [("out", 0), ("in", 1)], 100)
    same_sender = clock.reserve(("move", 1, 1), [("out", 0), ("in", 2)], 100)
    elsewhere = clock.reserve(("move", 1, 2), [("out", 3), ("in", 4)], 100)
    assert abs(first - now - 0.1) < 0.02 and abs(same_sender - first - 0.1) < 1e-9
    assert abs(elsewhere - now - 0.1) < 0.02
    # the receiver's end, asked later with its own view of the links, is the sender's
    assert clock.reserve(("move", 1, 1), [("out", 0), ("in", 2)], 100) == same_sender


class Real:
    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout=None) -> bool:
        self.waited = True
        return True


def test_a_paced_request_completes_after_its_transfer_and_its_links_time():
    end = time.monotonic() + 0.05
    assert not PacedRequest(Real(done=True), end).is_completed()  # the links' time is not over
    assert not PacedRequest(Real(done=False), end - 1).is_completed()  # the transfer is not over
    real = Real(done=True)
    PacedRequest(real, end).wait()
    assert real.waited and time.monotonic() >= end
