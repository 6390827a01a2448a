"""The regroup's peer-to-peer transfers (weights, KV rows): issued in an order NCCL cannot deadlock on, and
waited on within the collective timeout.

NCCL serialises a pair's sends and receives and a send waits for its receive, so two ranks that both send first
wait on each other for ever. Every rank here goes through its peers in rank order and, with each, the lower rank
sends first: all ranks walk the pairs in the same order, so the first unfinished pair always has both sides ready.
Gloo matches by tag and does not care; the order is the same there. `send` and `receive` issue one transfer each,
for a caller that walks one order every rank agrees on (`ft.planner.issue_order`).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_timeout_s: float | None = None  # the groups' collective bound (`elastic_tp/groups.set_collective_timeout`)


def set_wait_timeout(timeout_s: float | None) -> None:
    global _timeout_s
    _timeout_s = timeout_s


def exchange(me: int, sends: list[tuple[int, int, torch.Tensor]], recvs: list[tuple[int, int, torch.Tensor]],
             group) -> list:
    """Start every transfer of `group` (rank `me`): `sends` and `recvs` are (peer rank, tag, tensor); every
    tensor must be on the group's device. Returns the requests, for `wait_all`."""
    by_peer: dict[int, tuple[list, list]] = {}
    for peer, tag, tensor in sends:
        by_peer.setdefault(peer, ([], []))[0].append((tag, tensor))
    for peer, tag, tensor in recvs:
        by_peer.setdefault(peer, ([], []))[1].append((tag, tensor))
    requests = []
    for peer in sorted(by_peer):
        out, into = by_peer[peer]
        issue_sends = [lambda t=t, x=x: send(peer, t, x, group) for t, x in out]
        issue_recvs = [lambda t=t, x=x: receive(peer, t, x, group) for t, x in into]
        for issue in issue_sends + issue_recvs if me < peer else issue_recvs + issue_sends:
            requests.append(issue())
    return requests


def send(peer: int, tag: int, tensor: torch.Tensor, group):
    """Start sending `tensor` (on the group's device) to group rank `peer`; the request, for `wait`."""
    return dist.isend(tensor, group=group, tag=tag, group_dst=peer)


def receive(peer: int, tag: int, tensor: torch.Tensor, group):
    """Start receiving into `tensor` (on the group's device) from group rank `peer`; the request, for `wait`."""
    return dist.irecv(tensor, group=group, tag=tag, group_src=peer)


def arrived(request) -> bool:
    """Whether `request` finished (or failed: its `wait` raises), without blocking."""
    return request.is_completed()


def wait(request) -> None:
    """Wait for one request within the collective timeout (a dead peer fails the wait, never hangs it)."""
    if _timeout_s is None:
        request.wait()
    else:
        request.wait(timedelta(seconds=_timeout_s))


def wait_all(requests) -> None:
    """Wait for every request, each within the collective timeout."""
    for request in requests:
        wait(request)
