"""The new group's rendezvous (`elastic_tp/groups.join_store`): members arriving at different times all
get in, and a member waiting for a host that never comes gives up as soon as a newer regroup is ordered."""

import socket
import threading
import time

import psutil
import pytest

from ft.ports import free_port
from sglang_ft.elastic_tp.groups import Superseded, join_store


def test_members_arriving_at_different_times_all_join():
    port, stores = free_port(), {}

    def member(rank: int, delay_s: float):
        time.sleep(delay_s)
        stores[rank] = join_store(rank, 3, port, 4, lambda: False)

    threads = [threading.Thread(target=member, args=args) for args in ((1, 0.0), (2, 0.3), (0, 1.0))]  # host last
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(stores) == [0, 1, 2]
    assert all(store.add("members", 0) == 3 for store in stores.values())


def test_waiting_for_a_host_that_never_comes_stops_when_a_newer_regroup_is_ordered():
    ordered_at = time.monotonic() + 1.0
    started = time.monotonic()
    with pytest.raises(Superseded):
        join_store(1, 2, free_port(), 30, lambda: time.monotonic() > ordered_at)
    assert time.monotonic() - started < 5  # not the 100 s join timeout


def test_waiting_for_members_that_never_come_stops_when_a_newer_regroup_is_ordered():
    ordered_at = time.monotonic() + 1.0
    with pytest.raises(Superseded):
        join_store(0, 2, free_port(), 30, lambda: time.monotonic() > ordered_at)  # the host, alone


def test_the_host_listens_on_the_rendezvous_address_only():
    """torch's own TCPStore server listens on every interface (`::`); the new group's listens only where its members
    reach it, so no other host's connection gets in."""
    port, stores = free_port(), {}
    member = threading.Thread(target=lambda: stores.setdefault(1, join_store(1, 2, port, 4, lambda: False)))
    member.start()
    stores[0] = join_store(0, 2, port, 4, lambda: False, host="127.0.0.1")
    member.join(timeout=30)
    assert stores[1].add("members", 0) == 2  # the member got in through the rendezvous address
    listening = {c.laddr.ip for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:  # this machine's other addresses (none in a bare container) find nothing listening
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=1).close()


def test_a_store_port_held_by_a_connection_fails_the_regroup_at_once_and_the_worker_survives_it():
    """A connection's local port is the order's store port (the kernel gave it to an outgoing connection): the new
    rank 0 cannot listen there. It fails at once as a collective does (the controller orders again), not after the
    join timeout, and not as a bug that stops the worker."""
    from sglang_ft.elastic_tp.groups import StorePortTaken
    from sglang_ft.managers.ft_worker import is_collective_failure

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        taken = client.getsockname()[1]  # an ephemeral port in use by a live connection
        started = time.monotonic()
        with pytest.raises(StorePortTaken) as raised:
            join_store(0, 2, taken, 30, lambda: False)
        assert time.monotonic() - started < 2  # not the 100 s join timeout
        assert is_collective_failure(raised.value)
        client.close()
        accepted.close()


def test_free_ports_lie_below_the_ephemeral_range():
    """Read independently of ft.ports: a port below the range is never handed to an outgoing connection."""
    from pathlib import Path

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= port < low for port in ports), (low, ports)
    for port in ports:  # each was free: it binds
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
