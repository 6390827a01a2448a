"""Tear down this process's SGLang process groups and form the new TP group on a fresh store.

Survivors never restart: they drop every communicator locally (a collective teardown would block on the dead
peer), set their new TP rank and width in SGLang's parallel context, and let SGLang build its groups again. The
connections the new group opens are recorded, so a later interrupt shuts those alone (`group_interrupt.py`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from datetime import timedelta

from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_FACTOR = 3
JOIN_POLL_S = 1.0
REQUEST_BROADCAST_TIMEOUT_S = 2.0
LAST_REBUILD_MS: dict[str, float] = {}  # the last rebuild's parts (teardown, store, SGLang's groups), for its log line


class Superseded(RuntimeError):
    """A newer regroup was ordered while this one was still gathering its members: drop it for the newer one."""


class StorePortTaken(RuntimeError):
    """The new rank 0 cannot listen on the order's store port (another socket holds it): this regroup fails like a
    collective, the worker reports it and the controller orders the group again on another port. Waiting would not
    help: a connection holding the port keeps it as long as it lives."""


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _open_store(host: str, port: int, size: int, master: bool):
    """A TCPStore client, or its server listening on `host` only: torch's own server binds every interface, and
    nothing but the group's members at `host` should reach it. torch takes the listening socket as a descriptor and
    closes it with the store; it gets a duplicate, so ours is closed here whatever happens."""
    import socket

    import torch.distributed as dist

    timeout = timedelta(seconds=JOIN_POLL_S)
    if not master:
        return dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
    try:
        listener = socket.create_server((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StorePortTaken(f"the new group's store port {host}:{port} is in use: {exc}") from exc
        raise
    with listener:
        return dist.TCPStore(host, port, size, is_master=True, wait_for_workers=False, timeout=timeout,
                             master_listen_fd=os.dup(listener.fileno()))


def join_store(rank: int, size: int, port: int, timeout_s: float, superseded, host: str = "127.0.0.1"):
    """The new group's TCPStore, once every member has connected to it.

    Members reach a regroup at different times (some finish a collective timeout first), and the one hosting the
    store may die or move on to a newer order meanwhile. So nothing here blocks for long: connecting and waiting
    for the others are polled, and each poll gives up as soon as `superseded()` says a newer order exists.
    """
    import torch.distributed as dist

    deadline = time.monotonic() + JOIN_TIMEOUT_FACTOR * timeout_s + 10
    while True:
        if rank != 0 and not _listening(host, port):  # probe first: a refused TCPStore connect logs a C++ stack trace
            if superseded():
                raise Superseded("a newer regroup was ordered while waiting for this one's store")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the new group's store on port {port} never came up")
            time.sleep(0.02)
            continue
        try:
            store = _open_store(host, port, size, rank == 0)
            break
        except StorePortTaken:
            raise
        except (RuntimeError, dist.DistError, OSError):  # the host of the store is not listening (yet, or any more)
            if superseded():
                raise Superseded("a newer regroup was ordered while connecting to this one's store") from None
            if time.monotonic() > deadline:
                raise
    store.set_timeout(timedelta(seconds=timeout_s))
    store.add("members", 1)
    while store.add("members", 0) < size:
        if superseded():
            raise Superseded("a newer regroup was ordered while waiting for this one's members")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every member of the new group joined within {JOIN_TIMEOUT_FACTOR * timeout_s + 10}s")
        time.sleep(0.01)
    return store


def rebuild_process_groups(new_rank: int, new_size: int, store_port: int, timeout_s: float,
                           superseded=lambda: False, host: str = "127.0.0.1", store=None,
                           connections: set | None = None) -> None:
    """Drop this process's groups and build SGLang's for the new world; the new rank 0 hosts the store, which the
    others reach at `host` (the new rank 0's address: 127.0.0.1 on one node). A `store` given is used instead
    (a standby set's install, whose backends are connected already: `standby_groups.py`); the set's `connections`
    are the group's from the start of the install, so an interrupt frees a rank blocked in the install's own
    collectives; the few the install opens itself are recorded by SGLang's build's hook (`distributed/bootstrap.py`)."""
    import contextlib

    import torch.distributed as dist

    from sglang_ft.sglang_surface import (build_parallel_groups, get_device, get_parallel, parallel_group_stamp,
                                          tear_down_parallel_groups)

    parallel = get_parallel()
    started = time.monotonic()
    # Ranks and widths the launcher stamped; tearing the groups down clears them, so keep the plain values.
    placement = parallel_group_stamp()
    tear_down_parallel_groups()
    if dist.is_initialized():
        dist.distributed_c10d._world.default_pg = None
    for name in ("tp", "attn_tp", "moe_tp", "launch_world"):
        placement[f"{name}_rank"], placement[f"{name}_size"] = new_rank, new_size
    parallel.override_permanently(**placement)
    backend = "gloo" if get_device().device == "cpu" else "nccl"
    # Our own store: survivors still stuck in an old collective join late, so joining may take up to a few
    # collective timeouts; collectives in the new group time out after `timeout_s`.
    GROUP_CONNECTIONS.forget()
    if store is not None:
        GROUP_CONNECTIONS.adopt(connections or set())
    torn_down = time.monotonic()
    # What a newer order's interrupt may shut (group_interrupt.py). A standby install still opens a connection or
    # two (SGLang's build; 1-2 per member measured at TP 4 -> 3): its hook's recording catches them.
    with GROUP_CONNECTIONS.recording() if store is None else contextlib.nullcontext():
        store = join_store(new_rank, new_size, store_port, timeout_s, superseded, host) if store is None else store
        joined = time.monotonic()
        dist.init_process_group(backend, store=store, world_size=new_size, rank=new_rank,
                                timeout=timedelta(seconds=timeout_s))
        build_parallel_groups(backend, f"tcp://{host}:{store_port}", timedelta(seconds=timeout_s))
    set_collective_timeout(timeout_s)
    LAST_REBUILD_MS.clear()
    LAST_REBUILD_MS.update(teardown=(torn_down - started) * 1e3, store=(joined - torn_down) * 1e3,
                           groups=(time.monotonic() - joined) * 1e3)


def describe_last_rebuild() -> str:
    """The last rebuild's parts, for the stage's log line: where its time went."""
    return ", ".join(f"{part} {ms:.1f} ms" for part, ms in LAST_REBUILD_MS.items())


def set_collective_timeout(timeout_s: float) -> None:
    """Bound every collective of this process's groups (set once serving starts; startup keeps its own).

    The TP CPU group, which carries the per-iteration broadcast of new requests, gets a shorter bound: ranks
    meet there every iteration, so a long wait there means a peer is gone, and an idle survivor learns it fast.
    """
    import torch.distributed as dist

    from sglang_ft.distributed.p2p import set_wait_timeout
    from sglang_ft.sglang_surface import get_parallel

    set_wait_timeout(timeout_s)  # the regroup's peer transfers (p2p.py)
    request_group = get_parallel().tp_group.cpu_group
    for group in list(dist.distributed_c10d._world.pg_map):
        bound = min(timeout_s, REQUEST_BROADCAST_TIMEOUT_S) if group is request_group else timeout_s
        try:
            dist.set_timeout(timedelta(seconds=bound), group)
        except (ValueError, RuntimeError, AssertionError) as exc:
            logger.debug("sglang-ft: cannot set the timeout of %s: %s", group, exc)
