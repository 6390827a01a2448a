"""A failed collective is recognised by where it came from, not by its message (distributed/collective_failure.py);
an interrupt for a newer group aborts NCCL communicators and shuts only the old group's connections
(distributed/group_interrupt.py); scheduler processes get NCCL error handling that never ends them
(distributed/nccl_env.py)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sglang_ft.distributed.collective_failure import CollectiveFailure, collectives_may_fail
from sglang_ft.distributed.nccl_env import NCCL_ERROR_HANDLING
from tests.rank_processes import rank_context


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_rank(rank: int, port: int, peer_fault: str, results) -> None:
    """Rank 0 runs a collective inside `collectives_may_fail` after rank 1 died or hung; reports what it saw."""
    from sglang_ft.managers.ft_worker import is_collective_failure

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=2))
    tensor = torch.ones(4)
    dist.all_reduce(tensor)  # both alive
    if rank == 1:
        if peer_fault == "dies":
            os._exit(0)
        time.sleep(15)  # hangs past rank 0's timeout
        os._exit(0)
    time.sleep(0.5)
    try:
        with collectives_may_fail():
            dist.all_reduce(tensor)
        results.put(("completed",))
    except Exception as exc:  # what the FT worker's loop would catch
        results.put((type(exc).__name__, is_collective_failure(exc), type(exc.__cause__).__name__))
    results.close()
    results.join_thread()  # the queue's feeder thread has sent it before the exit below
    os._exit(0)


@pytest.mark.parametrize("peer_fault", ["dies", "hangs"])
def test_a_gloo_collective_with_a_dead_or_hung_peer_raises_collective_failure(peer_fault):
    context = rank_context()
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=_gloo_rank, args=(rank, port, peer_fault, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        seen = results.get(timeout=90)
    finally:
        for process in ranks:
            process.kill()
            process.join()
    # gloo raised a plain RuntimeError; the caller tells it apart by type alone
    assert seen == ("CollectiveFailure", True, "RuntimeError")


def test_an_error_of_the_step_itself_passes_through_unchanged():
    from sglang_ft.managers.ft_worker import is_collective_failure

    with pytest.raises(RuntimeError, match="^a bug in the step$") as raised:
        with collectives_may_fail():
            raise RuntimeError("a bug in the step")
    assert not isinstance(raised.value, CollectiveFailure) and not is_collective_failure(raised.value)
    # a misuse of torch.distributed (no group here) is a bug too, not a failed collective
    with pytest.raises(ValueError), collectives_may_fail():
        dist.all_reduce(torch.ones(1))
    # a failure raised from one keeps being one, and is not wrapped twice
    with pytest.raises(CollectiveFailure) as raised, collectives_may_fail():
        raise CollectiveFailure("peer gone")
    assert raised.value.__cause__ is None


def _gloo_pair(port: int, timeout_s: float) -> list:
    """Two gloo process groups of one pair, ranks 0 and 1 of this process (built together, on threads)."""
    groups: list = [None, None]

    def build(rank):
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=20))
        groups[rank] = (store, dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout_s)))

    threads = [threading.Thread(target=build, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return groups


def test_the_interrupt_frees_a_blocked_gloo_collective_and_leaves_zmq_connected(monkeypatch):
    import sglang.srt.distributed.parallel_state  # noqa: F401  (loaded in a scheduler; slow to import here)
    import zmq

    from sglang_ft.distributed import group_interrupt
    from sglang_ft.distributed.group_interrupt import GroupConnections, _established

    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    zmq_port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{zmq_port}")
    push.send(b"before")
    assert pull.recv() == b"before"
    zmq_links = {a for a in _established() if zmq_port in (a[0].port, a[1].port)}
    assert len(zmq_links) == 2  # both ends live in this process

    connections = GroupConnections()
    monkeypatch.setattr(group_interrupt, "GROUP_CONNECTIONS", connections)
    with connections.recording():
        groups = _gloo_pair(_free_port(), timeout_s=60)
    blocked: dict = {}

    def wait_alone():  # rank 1 never joins: without an interrupt this waits 60 s
        try:
            with collectives_may_fail():
                dist.all_reduce(torch.ones(2), group=groups[0][1])
        except CollectiveFailure as exc:
            blocked["failure"] = exc
        blocked["ended"] = time.monotonic()

    waiter = threading.Thread(target=wait_alone)
    waiter.start()
    time.sleep(0.5)
    interrupted = time.monotonic()
    aborted, shut = group_interrupt.interrupt_old_group()
    waiter.join(timeout=30)
    assert (aborted, "failure" in blocked) == (0, True) and blocked["ended"] - interrupted < 10
    assert shut >= 2  # the gloo pair's two ends (and the store's connections)
    assert zmq_links <= set(_established())  # the ZMQ connection was not touched ...
    push.send(b"after")
    assert pull.poll(5000) and pull.recv() == b"after"  # ... and still carries messages
    context.destroy(linger=0)


def test_the_connection_listing_from_the_process_own_sockets_equals_psutils():
    """The interrupt's listing reads the process's own socket descriptors instead of the machine's TCP tables: the
    same established connections (IPv4 and IPv6, both ends of each) as psutil lists, and neither lists a listener
    or a connection whose peer has closed it."""
    import socket

    import psutil

    from sglang_ft.distributed.group_interrupt import _established

    held = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        server = socket.create_server((host, 0), family=family)
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        held += [server, client, accepted]
    half = socket.create_connection(held[0].getsockname()[:2])
    peer, _ = held[0].accept()
    peer.close()  # `half` is left in CLOSE_WAIT
    time.sleep(0.1)
    mine = _established()
    by_psutil = {(tuple(c.laddr), tuple(c.raddr)): c.fd for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_ESTABLISHED}
    assert {(tuple(a), tuple(b)): fd for (a, b), fd in mine.items()} == by_psutil
    assert len([a for a in mine if a[0].ip in ("127.0.0.1", "::1")]) >= 4  # two connections, both ends each
    assert half.fileno() not in mine.values() and held[0].fileno() not in mine.values()
    for sock in held + [half]:
        sock.close()


def test_an_interrupt_aborts_nccl_groups_and_pynccl_communicators_with_what_torch_offers():
    from sglang_ft.distributed.group_interrupt import abort_nccl_groups, abort_pynccl_communicators

    calls = []

    class Group:
        def __init__(self, name, has_abort=True):
            self.name_ = name
            if has_abort:
                self.abort = lambda: calls.append(("abort", name))

        def _get_backend_name(self):
            return self.name_

        def _get_backend(self, device):  # an older torch: only the NCCL backend object can abort
            return SimpleNamespace(abort=lambda: calls.append(("backend abort", self.name_, device.type)))

    groups = [Group("nccl"), Group("gloo"), Group("cpu:gloo,cuda:nccl"), Group("nccl", has_abort=False)]
    assert abort_nccl_groups(groups) == 3
    assert calls == [("abort", "nccl"), ("abort", "cpu:gloo,cuda:nccl"), ("backend abort", "nccl", "cuda")]

    aborted_handles = []
    library = SimpleNamespace(ncclCommAbort=aborted_handles.append)
    communicator = lambda lib, handle: SimpleNamespace(  # noqa: E731  (SGLang's PyNcclCommunicator, as used)
        pynccl_comm=SimpleNamespace(nccl=SimpleNamespace(lib=lib), comm=handle, disabled=False))
    live, no_abort = communicator(library, "handle"), communicator(object(), "h2")
    assert abort_pynccl_communicators([live, no_abort, SimpleNamespace(pynccl_comm=None), None]) == 1
    assert aborted_handles == ["handle"] and live.pynccl_comm.disabled and live.pynccl_comm.comm is None
    assert abort_pynccl_communicators([live]) == 0  # never twice (SGLang only drops it afterwards)


def _read_after_the_hook(results=None) -> dict:
    """What a scheduler process does before its first group: SGLang's group creation, wrapped by the hook; the
    variables as SGLang's group creation sees them."""
    from sglang_ft.distributed.bootstrap import around_init_parallel_groups

    seen = around_init_parallel_groups(lambda **_: {n: os.environ.get(n) for n in NCCL_ERROR_HANDLING}, backend="nccl")
    if results is not None:
        results.put(seen)
    return seen


def test_a_scheduler_process_gets_nccl_error_handling_unless_the_user_set_it(monkeypatch):
    from sglang_ft.server_args import ft_args

    try:
        _check_nccl_env(monkeypatch, ft_args)
    finally:  # this process's FT options as they were
        monkeypatch.undo()
        ft_args.cache_clear()


def _check_nccl_env(monkeypatch, ft_args) -> None:
    from sglang_ft.server_args import FT_ENV, FtArgs

    for name in NCCL_ERROR_HANDLING:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.removeprefix("TORCH_"), raising=False)
    monkeypatch.setenv(FT_ENV, FtArgs(enabled=True).to_env())
    ft_args.cache_clear()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_read_after_the_hook, args=(results,))
    process.start()
    try:  # a fresh process, as SGLang spawns each scheduler; CleanUpOnly (2): abort the communicator, not the process
        assert results.get(timeout=120) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_BLOCKING_WAIT": "0"}
    finally:
        process.join(timeout=30)
    # the user's choice stands, under torch's name or its older alias
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("NCCL_BLOCKING_WAIT", "1")
    assert _read_after_the_hook() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_BLOCKING_WAIT": None}
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_BLOCKING_WAIT"):
        monkeypatch.delenv(name)
    monkeypatch.setenv(FT_ENV, FtArgs(enabled=False).to_env())  # without --ft, SGLang's defaults
    ft_args.cache_clear()
    assert _read_after_the_hook() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": None, "TORCH_NCCL_BLOCKING_WAIT": None}


def test_a_descriptor_reused_since_it_was_listed_is_not_shut(monkeypatch):
    """The group's connection was listed, then closed, and its descriptor number reused by another socket before
    the interrupt reached it (a standby set forming in the background opens gloo listeners): that socket is left
    alone. (A gloo listener shut down fails its accept, which gloo answers by aborting the whole process: a chaos
    soak's survivor died so.)"""
    import socket

    from sglang_ft.distributed import group_interrupt
    from sglang_ft.distributed.group_interrupt import GroupConnections

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    gone = ((("127.0.0.1", 1), ("127.0.0.1", 2)))  # the listed connection's addresses, its descriptor now another's
    connections = GroupConnections()
    connections._known = {gone}
    for fd in (listener.fileno(), accepted.fileno()):  # the number reused by a listener, or by another connection
        monkeypatch.setattr(group_interrupt, "_established", lambda fd=fd: {gone: fd})
        assert connections.shut_down() == 0
    listener.settimeout(5)
    late = socket.create_connection(listener.getsockname())
    assert listener.accept()[0]  # the listener still accepts
    client.sendall(b"x")
    assert accepted.recv(1) == b"x"  # and the other connection still carries data
    # the real connection, listed as it is, is shut
    monkeypatch.setattr(group_interrupt, "_established",
                        lambda: {(accepted.getsockname(), accepted.getpeername()): accepted.fileno()})
    connections._known = {(accepted.getsockname(), accepted.getpeername())}
    assert connections.shut_down() == 1 and client.recv(1) == b""
    for sock in (late, client, accepted, listener):
        sock.close()


def test_a_recording_inside_another_lists_nothing_and_loses_nothing(monkeypatch):
    """The regroup's rebuild records around SGLang's build, whose hook records too: the inner recording lists no
    connection (each listing costs 20-40 ms under load) and the outer one still records what the inner block
    opened; a recording in another thread (the standby formation's) is not affected."""
    from sglang_ft.distributed import group_interrupt

    established = {("a", "b"): 3}
    listings = []

    def snapshot():
        listings.append(dict(established))
        return set(established)

    def opened_since(before):
        listings.append(dict(established))
        return set(established) - before

    monkeypatch.setattr(group_interrupt, "_snapshot", snapshot)
    monkeypatch.setattr(group_interrupt, "_opened_since", opened_since)
    connections = group_interrupt.GroupConnections()
    with connections.recording():
        established[("c", "d")] = 4  # opened by the store join
        with connections.recording():  # SGLang's build, through its hook
            established[("e", "f")] = 5
        def other_thread_records():
            with connections.recording():
                pass

        other = threading.Thread(target=other_thread_records)
        other.start()
        other.join()
    assert len(listings) == 4  # the outer window's two and the other thread's two; the inner block's none
    assert connections._known == {("c", "d"), ("e", "f")}
    with connections.recording():  # after it, a recording lists again
        pass
    assert len(listings) == 6


def test_under_ft_sglangs_groups_broadcast_objects_over_gloo_not_the_shared_memory_queue(monkeypatch, caplog):
    """SGLang's shared-memory broadcaster waits on a dead writer forever (its readers spin, warning only), where a
    gloo broadcast raises; under --ft the hook turns it off before the first group unless the user set it (then
    kept, with a warning); without --ft SGLang's default stands. Read back through SGLang's own setting, which its
    group build reads."""
    from sglang.srt.environ import envs

    from sglang_ft.server_args import FT_ENV, FtArgs, ft_args
    from sglang_ft.distributed.bootstrap import around_init_parallel_groups

    name = "SGLANG_USE_MESSAGE_QUEUE_BROADCASTER"
    as_sglang_reads_it = lambda **_: envs.SGLANG_USE_MESSAGE_QUEUE_BROADCASTER.get()  # noqa: E731
    saved = dict(os.environ)  # the hook sets NCCL's variables too: this process's environment is put back whole
    try:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(FT_ENV, FtArgs(enabled=False).to_env())
        ft_args.cache_clear()
        assert around_init_parallel_groups(as_sglang_reads_it, backend="gloo") is True  # SGLang's default
        monkeypatch.setenv(FT_ENV, FtArgs(enabled=True).to_env())
        ft_args.cache_clear()
        assert around_init_parallel_groups(as_sglang_reads_it, backend="gloo") is False
        monkeypatch.setenv(name, "true")
        with caplog.at_level("WARNING"):
            assert around_init_parallel_groups(as_sglang_reads_it, backend="gloo") is True
        assert "waits forever on a dead peer" in caplog.text
    finally:
        monkeypatch.undo()
        os.environ.clear()
        os.environ.update(saved)
        ft_args.cache_clear()


def test_a_recording_lists_the_connections_opened_in_it_even_on_a_reused_descriptor():
    """A recording's second listing reads only the sockets new since its first: a connection opened on the
    descriptor number of one closed meanwhile is new (another inode), one open throughout is not."""
    import socket

    from sglang_ft.distributed.group_interrupt import GroupConnections, _established

    listener = socket.create_server(("127.0.0.1", 0))
    throughout = socket.create_connection(listener.getsockname())
    closing = socket.create_connection(listener.getsockname())
    accepted = [listener.accept()[0] for _ in range(2)]
    old_fd = closing.fileno()
    connections = GroupConnections()
    with connections.recording():
        closing.close()
        reused = socket.create_connection(listener.getsockname())
        accepted.append(listener.accept()[0])
    assert reused.fileno() == old_fd  # the lowest free number: the one just closed
    address = lambda sock: (sock.getsockname()[:2], sock.getpeername()[:2])  # noqa: E731
    assert {address(reused), address(accepted[-1])} <= {(tuple(a), tuple(b)) for a, b in connections._known}
    assert address(throughout) not in {(tuple(a), tuple(b)) for a, b in connections._known}
    assert address(throughout) in {(tuple(a), tuple(b)) for a, b in _established()}
    for sock in [throughout, reused, listener] + accepted:
        sock.close()
