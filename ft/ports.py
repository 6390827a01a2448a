"""Port allocation for the stores and servers sglang-ft starts."""

from __future__ import annotations

import random
import socket

LOWEST_PORT = 10000


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections and to bind(0) (Linux's default where unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, below the kernel's ephemeral range where there is room; the caller binds it
    right away.

    A port bind(0) hands out lies in the ephemeral range, where the kernel may give it to the next outgoing
    connection before the caller binds it (a regroup's group opens many); a store that then binds it fails with
    EADDRINUSE. Below the range only listeners compete, and a bound one is skipped here.
    """
    low, _ = ephemeral_range()
    for port in random.sample(range(LOWEST_PORT, low), min(64, max(low - LOWEST_PORT, 0))):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range (or every try was taken): the kernel's pick
        sock.bind((host, 0))
        return sock.getsockname()[1]
