"""Loopback port allocation for the stores and servers sglang-ft starts."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it); the caller binds it right away."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
