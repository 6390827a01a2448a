"""Standby groups (`distributed/standby_groups.py`): connected before a failure, installed for a single failure with
no new connection, discarded after any other membership, never used by a fenced or superseded process.

The ranks are real processes on gloo and a TCPStore, building their groups as SGLang's build does (a default
group, then a device and a CPU group per coordinator, groups of one besides), without SGLang itself.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from ft.ports import free_port

from sglang_ft.distributed.standby_groups import (AGREE_TIMEOUT_S, StandbyGroups, StandbySet, gloo_backends_needed,
                                                  gloo_singletons_held, installing)
from tests.rank_processes import rank_context

TIMEOUT = timedelta(seconds=30)


def build_like_sglang(size: int, rank: int):
    """The groups SGLang's `_init_parallel_groups` builds for TP only, on an initialised world: its coordinators
    (world, tp) each a device and a CPU group of everyone, and PP groups of one (which every rank creates for all)."""
    import torch.distributed as dist

    groups = []
    for name in ("world", "tp"):
        for kind in ("device", "cpu"):
            groups.append(dist.new_group(list(range(size)), backend="gloo", timeout=TIMEOUT, group_desc=f"{name}:{kind}"))
    for kind in ("device", "cpu"):
        for member in range(size):
            group = dist.new_group([member], backend="gloo", timeout=TIMEOUT, group_desc=f"pp:{kind}")
            if member == rank:
                groups.append(group)
    return groups


def tcp_connections() -> set:
    import psutil

    return {(c.laddr, c.raddr) for c in psutil.Process().net_connections(kind="tcp") if c.status == "ESTABLISHED"}


def serving_with_standby_sets(rank: int, size: int, port: int) -> tuple[StandbyGroups, int]:
    """A rank of a group of `size` with SGLang-like groups, once its standby sets are formed; and how many gloo
    backends each set holds."""
    import torch.distributed as dist

    from sglang_ft.distributed.group_interrupt import GroupConnections

    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, wait_for_workers=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    build_like_sglang(size, rank)
    count = gloo_backends_needed(size)
    standby = StandbyGroups(GroupConnections())
    standby.prepare(0, tuple(range(size)), rank, lambda _superseded: dist.distributed_c10d._get_default_store(),
                    30.0, count, gloo_singletons_held()).join()
    return standby, count


def rank_main(rank: int, size: int, port: int, scenario: str, results) -> None:
    import torch
    import torch.distributed as dist

    try:
        standby, count = serving_with_standby_sets(rank, size, port)
        formed = {m for m in [tuple(w for w in range(size) if w != lost) for lost in range(size)]
                  if standby.ready(m)}
        dist.barrier()  # every rank holds its sets before worker 0 (the store's host) goes
        if rank == 0:
            results.put((rank, {"formed": formed}))
            results.close()
            results.join_thread()  # the message is out before the process goes
            os._exit(0)  # SIGKILL-like: no teardown
        dist.destroy_process_group()  # the old group, dropped locally (the regroup aborts it)
        survivors = tuple(range(1, size))
        new_rank = survivors.index(rank)
        if scenario == "disagree" and rank == size - 1:  # its set is not complete yet (its connections stay open)
            unfinished = standby._ready.pop(tuple(range(1, size)))  # noqa: F841 (kept open until the end)
        before = tcp_connections()
        started = time.perf_counter()
        taken = standby.take(rank, 0, 1, survivors, 1)
        out = {"formed": formed, "count": count, "taken": taken is not None, "cpu_s": standby.formed_cpu_s}
        if taken is not None:
            formed_singles = {id(b) for b in taken.singles}
            with installing(taken):
                dist.init_process_group("gloo", store=dist.HashStore(), rank=new_rank, world_size=len(survivors),
                                        timeout=TIMEOUT)
                groups = build_like_sglang(len(survivors), new_rank)
            out["install_s"] = time.perf_counter() - started
            out["new_connections"] = len(tcp_connections() - before)
            of_one = [g._get_backend(torch.device("cpu")) for g in groups if dist.get_world_size(g) == 1]
            out["singles_from_the_set"] = (len(formed_singles), sum(id(b) in formed_singles for b in of_one))
            sums = []
            for group in [None] + groups:
                ones = torch.ones(2)
                dist.all_reduce(ones, group=group)
                sums.append(ones.tolist())
            out["sums"] = sums
            out["sizes"] = [dist.get_world_size(g) for g in [None] + groups]
        else:
            out["fallback_after_s"] = time.perf_counter() - started
            if scenario == "disagree":
                time.sleep(AGREE_TIMEOUT_S + 2)  # alive, rebuilding (its connections would close if it exited)
        results.put((rank, out))
    except Exception as exc:  # reported to the test, with the rank
        results.put((rank, {"error": repr(exc)}))


def run_ranks(size: int, scenario: str, timeout_s: float = 240.0, target=None, expected=None) -> dict:
    """Run `target` (rank_main) for `scenario` on `size` ranks; the results of the `expected` ranks (all)."""
    context = rank_context()
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=target or rank_main, args=(r, size, port, scenario, results)) for r in range(size)]
    for proc in procs:
        proc.start()
    out = {}
    deadline = time.monotonic() + timeout_s
    expected = range(size) if expected is None else expected
    try:
        while len(out) < len(expected) and time.monotonic() < deadline:
            rank, result = results.get(timeout=max(1.0, deadline - time.monotonic()))
            out[rank] = result
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert not [r for r in out.values() if "error" in r], out
    return out


def test_a_single_failure_installs_the_preformed_groups_without_connecting():
    out = run_ranks(4, "single")
    # every worker holds the sets of the three memberships it belongs to (its own loss leaves no set for it)
    assert out[0]["formed"] == {(0, 1, 2), (0, 1, 3), (0, 2, 3)}
    for rank in (1, 2, 3):
        result = out[rank]
        assert result["formed"] == {m for m in [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)] if rank in m}
        assert result["count"] == 5  # the default group and a device and a CPU group per coordinator
        assert result["taken"] and result["new_connections"] == 0  # nothing connected on the critical path
        assert result["sizes"] == [3] * 5 + [1, 1]
        assert result["singles_from_the_set"] == (2, 2)  # the groups of one were formed in advance too
        assert result["sums"] == [[3.0, 3.0]] * 5 + [[1.0, 1.0]] * 2  # every group works across the survivors
        assert result["install_s"] < 0.2, result  # milliseconds in fact; bounded loosely on a shared 2-core host
        assert result["cpu_s"] < 1.0, result  # forming 3 sets of 6 backends, in the background
        print(f"rank {rank}: install {result['install_s'] * 1e3:.1f} ms, forming {result['cpu_s'] * 1e3:.0f} ms CPU")


MEMBER_STAYS_S = 6.0


def install_blocked_main(rank: int, size: int, port: int, _scenario: str, results) -> None:
    """Rank 0 goes; the survivors 1 and 2 take their set. Rank 2 installs it through the regroup's
    `rebuild_process_groups` (SGLang's build stood in for by `build_like_sglang` and a collective on the new TP
    group, as SGLang's own build runs one); rank 1 never comes, so rank 2 blocks there until the interrupt a newer
    order would send (`interrupt_old_group`'s shutdown of the group's connections, from another thread) frees it."""
    import threading
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from sglang_ft import sglang_surface
    from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS
    from sglang_ft.elastic_tp.groups import rebuild_process_groups

    try:
        standby, _count = serving_with_standby_sets(rank, size, port)
        dist.barrier()
        if rank == 0:
            os._exit(0)
        dist.destroy_process_group()
        taken = standby.take(rank, 0, 1, (1, 2), 1)
        if rank == 1:  # holds its set (its connections open) and never builds; when it goes, rank 2 is freed anyway
            time.sleep(MEMBER_STAYS_S)
            results.put((rank, {"taken": taken is not None}))
            return

        def build(*_args):
            groups = build_like_sglang(2, 1)
            dist.all_reduce(torch.ones(2), group=groups[-3])  # the TP CPU group: rank 1 never joins it

        for name, value in {"build_parallel_groups": build, "tear_down_parallel_groups": lambda: None,
                            "parallel_group_stamp": dict, "get_device": lambda: SimpleNamespace(device="cpu"),
                            "get_parallel": lambda: SimpleNamespace(override_permanently=lambda **_: None)}.items():
            setattr(sglang_surface, name, value)
        shut = []
        # the interrupt's gloo half (its NCCL half would import SGLang here: seconds, and nothing to abort on CPU)
        interrupt = threading.Timer(0.5, lambda: shut.append((time.monotonic(), GROUP_CONNECTIONS.shut_down())))
        interrupt.start()
        started = time.monotonic()
        try:
            with installing(taken):
                rebuild_process_groups(1, 2, port, 30.0, store=dist.HashStore(), connections=taken.connections)
            outcome = "built"
        except Exception as exc:  # the blocked collective, freed
            outcome = f"{type(exc).__name__}: {exc}"[:300]
        results.put((rank, {"taken": taken is not None, "outcome": outcome, "ended_s": time.monotonic() - started,
                            "interrupted_s": shut[0][0] - started if shut else None,
                            "connections_shut": shut[0][1] if shut else 0}))
    except Exception as exc:  # reported to the test, with the rank
        results.put((rank, {"error": repr(exc)}))


def test_an_interrupt_frees_a_member_blocked_inside_the_install_of_a_standby_set():
    """The set's connections are the group's from the start of its install: a member blocked in the install's own
    collectives (a peer died or moved on meanwhile) is freed by the newer order's interrupt, not by the 30 s
    timeout. (They were adopted only once the install was done, and an interrupt then shut none of them.)"""
    out = run_ranks(3, "install_blocked", target=install_blocked_main, expected=(1, 2))
    assert out[1]["taken"] and out[2]["taken"]
    result = out[2]
    assert result["outcome"] != "built" and result["connections_shut"] > 0, result
    # freed by the interrupt: long before the absent member goes (which would free it too), let alone 30 s
    assert result["ended_s"] - result["interrupted_s"] < MEMBER_STAYS_S - 3, result


GLOO_TIMER_SLACK_S = 0.05


def test_a_member_without_the_set_makes_every_member_rebuild():
    out = run_ranks(4, "disagree")
    assert out[3]["taken"] is False and out[3]["fallback_after_s"] < 0.1  # it knows at once
    for rank in (1, 2):  # they meet on the set's agreement backend; the member without it never comes
        assert out[rank]["taken"] is False
        # waited out the agreement timeout (not at once, as rank 3): gloo's own timer fired 6 ms before this
        # process's clock read 1.0 s in one clean run, so its precision, not ours, is allowed for
        assert AGREE_TIMEOUT_S - GLOO_TIMER_SLACK_S <= out[rank]["fallback_after_s"] < AGREE_TIMEOUT_S + 4, out[rank]


def eventually(condition, timeout_s: float = 5.0) -> bool:
    """`condition()` within a few seconds (the discarding thread shuts sets down in the background)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def released(*sets: StandbySet) -> bool:
    """Every set shut down."""
    return eventually(lambda: not any(s.backends for s in sets))


def all_shut(backends) -> bool:
    """Every (fake) backend shut down."""
    return eventually(lambda: all(b.shut for b in backends))


class FakeBackend:
    def __init__(self):
        self.shut = False

    def shutdown(self):
        self.shut = True


def holding(*memberships, epoch: int = 4) -> tuple[StandbyGroups, dict]:
    """Standby groups holding a (fake) complete set per membership, formed in `epoch`; of one member each, so
    taking one needs no meeting."""
    standby = StandbyGroups()
    standby._epoch = epoch
    sets = {}
    for members in memberships:
        sets[members] = StandbySet(epoch, members, 0, None, [FakeBackend()], set())
    standby._ready = dict(sets)
    standby._singles = [FakeBackend(), FakeBackend()]  # the groups of one, for whichever set is taken
    return standby, sets


@pytest.mark.parametrize("workers", [(0,), (0, 1, 2, 3), (0, 1, 2, 3, 4), (2, 0)], ids=[
    "second_failure", "rejoin", "newcomer", "other_rank_order"])
def test_a_different_membership_discards_every_set(workers):
    standby, sets = holding((0, 1), (0, 2), (1, 2))
    singles = list(standby._singles)
    assert standby.take(0, 4, 5, workers, 5) is None
    assert not any(standby.ready(m) for m in sets)
    assert released(*sets.values())  # shut down, not just forgotten
    assert all_shut(singles) and standby._singles == []


def test_the_matching_membership_takes_its_set_and_drops_the_others():
    standby, sets = holding((0, 1), (0, 2), (1, 2))
    singles = list(standby._singles)
    taken = standby.take(0, 4, 5, (0, 2), 5)
    assert taken is sets[(0, 2)] and taken.backends and not taken.backends[0].shut
    assert taken.singles == singles and not any(b.shut for b in singles)  # handed over with the set
    assert released(sets[(0, 1)], sets[(1, 2)]) and not standby.ready((0, 1))


@pytest.mark.parametrize("me, epoch, order_epoch, latest", [
    (3, 4, 5, 5),  # fenced: not a member of the ordered group
    (0, 4, 5, 6),  # superseded: a newer order exists
    (0, 5, 6, 6),  # its last regroup failed half way: the sets are of an older epoch than its own
    (0, 4, 4, 4),  # an order that is not newer than the sets' epoch
], ids=["fenced", "superseded", "older_sets", "stale_order"])
def test_a_fenced_or_superseded_process_never_uses_a_set(me, epoch, order_epoch, latest):
    standby, sets = holding((0, 2))
    assert standby.take(me, epoch, order_epoch, (0, 2), latest) is None
    assert released(sets[(0, 2)])


def test_sets_are_dropped_when_a_newer_epoch_forms_its_own():
    standby, sets = holding((0, 1))
    singles = list(standby._singles)
    assert standby.prepare(5, (0, 1, 2), 0, lambda _: None, 1.0, None) is None  # nothing to form (count None)
    assert not standby.ready((0, 1)) and released(sets[(0, 1)])
    assert all_shut(singles)


def test_without_nccl_groups_the_listener_aborts_as_before_and_never_meets():
    """On CPU there is nothing to shrink: the order listener interrupts the old group as before (`interrupt_for`),
    without meeting the others on the set (which the regroup's own take does)."""
    from types import SimpleNamespace

    from sglang_ft.distributed.standby_groups import agree
    from sglang_ft.distributed.standby_nccl import shrink_for

    class NoMeeting(FakeBackend):
        def allreduce(self, *_):
            raise AssertionError("met on the agreement backend")

    standby, sets = holding((0, 2))
    sets[(0, 2)].agreement = NoMeeting()
    assert shrink_for(SimpleNamespace(workers=(0, 2), epoch=5), (0, 1, 2), standby, agree) is False
    assert standby.ready((0, 2))  # left for the regroup
