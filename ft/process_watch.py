"""Know the moment a worker's process exits, without polling /proc.

Linux gives a pidfd for any process (not only a child) that becomes readable when the process terminates (a zombie
counts: its parent has not reaped it yet). The controller waits on these descriptors together with its heartbeat
socket, so a SIGKILLed worker wakes it at once instead of at its next sweep, and an idle controller costs nothing.
Where pidfds are missing (not Linux, kernel < 5.3), `gone` falls back to asking psutil.
"""

from __future__ import annotations

import os
import select

import psutil

HAS_PIDFD = hasattr(os, "pidfd_open")


class ProcessWatch:
    """pidfds of the processes asked about, opened on first use and closed with `forget` or `close`."""

    def __init__(self, use_pidfd: bool = HAS_PIDFD):
        self.use_pidfd = use_pidfd
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self._gone: set[int] = set()

    def gone(self, pid: int | None) -> bool:
        """Has process `pid` exited (or become a zombie)? None (no pid known yet): no."""
        if pid is None:
            return False
        if pid in self._gone:
            return True
        if not self.use_pidfd:
            return _gone_by_psutil(pid)
        fd = self._fds.get(pid)
        if fd is None:
            try:
                fd = self._fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self._gone.add(pid)
                return True
            except OSError:  # e.g. ENOSYS on an old kernel
                self.use_pidfd = False
                return _gone_by_psutil(pid)
        readable, _, _ = select.select([fd], [], [], 0)
        if readable:
            self._gone.add(pid)
        return bool(readable)

    def fds(self, pids) -> list[int]:
        """Descriptors `gone` has opened for `pids` (each readable once its process exits), without checking them
        again; none for a process already known to be gone (it would wake every wait) and none without pidfds."""
        return [self._fds[pid] for pid in pids if pid in self._fds and pid not in self._gone]

    def forget(self, pid: int | None) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)
        self._gone.discard(pid)

    def close(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)


def _gone_by_psutil(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
