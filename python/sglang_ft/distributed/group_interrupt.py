"""Make a collective of the old group that is still blocked fail now, when a newer group is ordered.

A survivor can be blocked on a peer that died or moved on: inside an NCCL kernel (freed only by aborting the
communicator) or in a gloo collective (freed by shutting the gloo pair's TCP connection). Both are local actions
taken from the order-listener thread; nothing else of the process is touched: the TCP connections shut are
those the group opened while it was created (`GROUP_CONNECTIONS`), never the worker's ZMQ links or any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import NamedTuple

logger = logging.getLogger(__name__)


class Address(NamedTuple):
    ip: str
    port: int


TCP_ESTABLISHED = 1  # the first byte of Linux's struct tcp_info, tcpi_state


def _sockets() -> dict[int, int] | None:
    """This process's socket descriptors and their inodes (`fstat`, no socket touched: 0.5 ms for some 270
    descriptors); None where /proc is missing."""
    import stat

    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    found = {}
    for name in names:
        try:
            st = os.fstat(int(name))
        except OSError:  # closed since the listing
            continue
        if stat.S_ISSOCK(st.st_mode):
            found[int(name)] = st.st_ino
    return found


def _established(since: dict[int, int] | None = None) -> dict[tuple, int]:
    """This process's established TCP connections: (local address, remote address) -> descriptor; with `since`
    (an earlier `_sockets()`), only those on sockets created after it.

    Read from its own socket descriptors (/proc/self/fd and the sockets themselves): about 2 ms for every socket
    of a TP 4 scheduler, where psutil's listing, which parses the whole machine's /proc/net/tcp tables, took 20 ms
    a call; a recording's second listing reads only the sockets new since its first (a descriptor reused for
    another socket has another inode). psutil where /proc is missing."""
    sockets = _sockets()
    if sockets is None:
        return _established_by_psutil()
    found = {}
    for fd, inode in sockets.items():
        if since is not None and since.get(fd) == inode:
            continue
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != TCP_ESTABLISHED:
                    continue
                local, remote = sock.getsockname(), sock.getpeername()
        except OSError:  # closed since the listing, or not a socket we may read
            continue
        found[(Address(*local[:2]), Address(*remote[:2]))] = fd
    return found


def _snapshot() -> dict[int, int] | set[tuple]:
    """What a recording compares against: the socket inodes, or (without /proc) the connections themselves."""
    sockets = _sockets()
    return set(_established_by_psutil()) if sockets is None else sockets


def _opened_since(before: dict[int, int] | set[tuple]) -> set[tuple]:
    if isinstance(before, set):
        return set(_established()) - before
    return set(_established(since=before))


def _established_by_psutil() -> dict[tuple, int]:
    import psutil

    return {(Address(*c.laddr), Address(*c.raddr)): c.fd for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.fd >= 0}


class GroupConnections:
    """The TCP connections of the current group: its store client (or the store's accepted clients, on the rank
    hosting it) and its gloo pairs, recorded as those that appeared while the group was being created. A group
    still being created counts the connections opened so far, so an interrupt frees a rank stuck there too."""

    def __init__(self):
        self._lock = threading.Lock()
        self._known: set[tuple] = set()
        self._open_windows: list = []  # each running recording's `_snapshot()` from when it began
        self._this_thread = threading.local()  # `covered`: a recording already runs in this thread

    def forget(self) -> None:
        """A new group is being created: the old one's connections are gone with it."""
        with self._lock:
            self._known.clear()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the connections opened while the block runs (a group's creation) as the group's. Inside another
        recording of this thread it lists nothing (the outer one records all the inner block opens): the regroup's
        rebuild wraps SGLang's build, whose own hook records too."""
        if getattr(self._this_thread, "covered", False):
            yield
            return
        self._this_thread.covered = True
        try:
            with self._window():
                yield
        finally:
            self._this_thread.covered = False

    @contextlib.contextmanager
    def _window(self) -> Iterator[None]:
        before = _snapshot()
        with self._lock:
            self._open_windows.append(before)
        try:
            yield
        finally:
            opened = _opened_since(before)
            with self._lock:
                self._open_windows.remove(before)
                self._known |= opened

    @contextlib.contextmanager
    def opened(self) -> Iterator[set]:
        """The connections opened while the block runs, kept apart from the group's (a standby set's, which
        becomes the group's only when it is installed: `adopt`)."""
        before, opened = _snapshot(), set()
        yield opened
        opened |= _opened_since(before)

    def adopt(self, connections: set) -> None:
        """Standby connections became the group's (`standby_groups.py`): an interrupt shuts them from now on."""
        with self._lock:
            self._known |= set(connections)

    def shut_down(self) -> int:
        """Shut down the group's connections still open; returns how many.

        `shutdown` acts on the socket while the owner keeps its descriptor, so nothing is closed under the
        communicator's feet: its blocked read or write fails at once ("connection closed").
        """
        established = _established()
        with self._lock:
            targets = set(self._known)
            windows = list(self._open_windows)
        for before in windows:
            targets |= _opened_since(before)
        count = 0
        for address, fd in established.items():
            if address not in targets:
                continue
            try:
                with socket.socket(fileno=os.dup(fd)) as sock:
                    # the descriptor may have been closed since it was listed and reused (a standby set forming in
                    # the background opens gloo's listening sockets): shut it only if it is still that connection.
                    # Shutting a gloo listener makes its accept fail, which gloo answers by aborting the process.
                    if (sock.getsockname()[:2], sock.getpeername()[:2]) != (tuple(address[0]), tuple(address[1])):
                        continue
                    sock.shutdown(socket.SHUT_RDWR)
                count += 1
            except OSError:  # gone, or not connected (a listener): not the group's connection
                continue
        return count


GROUP_CONNECTIONS = GroupConnections()


def _backend_name(group) -> str:
    import torch.distributed as dist

    try:
        return str(dist.get_backend(group))
    except (ValueError, RuntimeError, AttributeError):
        name = getattr(group, "_get_backend_name", None) or getattr(group, "name", None)
        return str(name()) if callable(name) else ""


def abort_nccl_groups(groups=None) -> int:
    """Abort this process's NCCL process groups locally (no collective, safe from another thread): a survivor
    blocked in one of their kernels returns, and the group's next use raises. `groups` defaults to every
    group torch knows; returns how many were aborted.

    Feature-detected on the installed torch: `ProcessGroup.abort` per NCCL group (torch >= 2.6, which also has
    `_abort_process_group`, but that one aborts every group, gloo's included, and the gloo path stays as it
    is); else the NCCL backend's own `abort`. torch's `shrink_group` is not used: it needs every survivor to
    call it together on a healthy communicator, while the regroup builds a fresh group (restarted workers too).
    """
    import torch
    import torch.distributed as dist

    if groups is None:
        groups = list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []
    aborted = 0
    for group in groups:
        if "nccl" not in _backend_name(group):  # "nccl", or "cpu:gloo,cuda:nccl" for a group of both
            continue
        abort = getattr(group, "abort", None)
        if abort is None and hasattr(group, "_get_backend"):
            abort = getattr(group._get_backend(torch.device("cuda")), "abort", None)
        if abort is None:
            logger.warning("sglang-ft: this torch cannot abort NCCL group %s; its collectives end at the timeout",
                           group)
            continue
        try:
            abort()
            aborted += 1
        except Exception as exc:  # already aborted by the watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING=2)
            logger.debug("sglang-ft: abort of %s: %s", group, exc)
    return aborted + abort_pynccl_communicators()


def abort_pynccl_communicators(coordinators=None) -> int:
    """Abort SGLang's own NCCL communicators (pynccl, the all-reduce inside CUDA graphs), which torch does not
    know: `ncclCommAbort` through the library SGLang loaded, if it exports it. Each is then disabled, so SGLang
    never calls into it again; its teardown only drops the reference."""
    if coordinators is None:
        from sglang_ft.sglang_surface import group_coordinators

        coordinators = group_coordinators()
    aborted = 0
    for coordinator in coordinators:
        comm = getattr(coordinator, "pynccl_comm", None)
        if comm is None or getattr(comm, "disabled", False) or getattr(comm, "comm", None) is None:
            continue
        abort = getattr(getattr(comm.nccl, "lib", None), "ncclCommAbort", None)
        if abort is None:
            continue
        abort(comm.comm)
        comm.disabled, comm.comm = True, None
        aborted += 1
    return aborted


def interrupt_old_group() -> tuple[int, int]:
    """Make every collective of the current group that is still waiting fail now: abort its NCCL
    communicators (none on CPU), then shut down its gloo connections. Returns (aborted, connections shut)."""
    return abort_nccl_groups(), GROUP_CONNECTIONS.shut_down()
