"""The regroup's agreement over a CPU group (distributed/rank_agreement.py), on three gloo processes: every rank
gets every rank's object in rank order, in one all-gather when each fits the fixed slot and in two when one does
not; the answers compared with what each rank was built to send."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from tests.rank_processes import rank_context

RANKS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def object_of(rank: int, big_on: int | None) -> dict:
    """What rank `rank` sends: a few request lengths, or (on `big_on`) a ledger's worth of rids past the slot."""
    count = 5000 if rank == big_on else 3
    return {"rank": rank, "lengths": {f"rid-{rank}-{i:032d}": i * rank for i in range(count)}}


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from sglang_ft.distributed import rank_agreement

    store = dist.TCPStore("127.0.0.1", port, RANKS, is_master=rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=RANKS, timeout=timedelta(seconds=30))
    calls = []
    all_gather = dist.all_gather
    dist.all_gather = lambda *args, **kwargs: calls.append(1) or all_gather(*args, **kwargs)
    seen = []
    for big_on in (None, 2, None):  # small, one rank past the slot, small again (nothing left over in between)
        before = len(calls)
        everyone = rank_agreement.all_gather_object(object_of(rank, big_on), None)
        seen.append((everyone == [object_of(r, big_on) for r in range(RANKS)], len(calls) - before))
    results.put((rank, seen))
    dist.destroy_process_group()


def test_every_rank_gets_every_object_in_one_collective_or_two_when_one_is_large():
    import pickle

    from sglang_ft.distributed.rank_agreement import SLOT_BYTES

    assert len(pickle.dumps(object_of(2, 2))) > SLOT_BYTES > len(pickle.dumps(object_of(2, None)))
    context = rank_context()
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(RANKS)]
    for process in ranks:
        process.start()
    try:
        seen = dict(results.get(timeout=120) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=30)
            process.kill()
    assert seen == {rank: [(True, 1), (True, 2), (True, 1)] for rank in range(RANKS)}


@pytest.mark.parametrize("value", [None, (), {"a": [1, 2]}])
def test_one_rank_gets_its_own_object(value, tmp_path):
    import torch.distributed as dist

    from sglang_ft.distributed.rank_agreement import all_gather_object

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "f"), 1), rank=0, world_size=1)
    try:
        assert all_gather_object(value, dist.group.WORLD) == [value]
    finally:
        if created:
            dist.destroy_process_group()
