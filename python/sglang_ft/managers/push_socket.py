"""A fresh ZMQ PUSH socket in place of one whose peers must all go.

A hung TP rank 0 keeps its connection open: the kernel keeps accepting bytes for it and PUSH goes on handing it
every other message. Closing the socket drops every connection; a fresh one bound at the same endpoint is where
the new rank 0 (re)connects. The tokenizer manager's journal does this for its own socket, SGLang's DP controller
(replica_outbox.py) for a replica's.
"""

from __future__ import annotations

import time

import zmq


def fresh_push_socket(old: zmq.Socket) -> tuple[zmq.Socket, str]:
    """Close `old` (its peers and what it queued for them) and return an unbound PUSH socket with its send options,
    and the endpoint `old` was bound at."""
    endpoint = old.getsockopt(zmq.LAST_ENDPOINT).decode()
    fresh = old.context.socket(zmq.PUSH)
    for option in (zmq.SNDHWM, zmq.SNDBUF):
        fresh.setsockopt(option, old.getsockopt(option))
    old.close(linger=0)
    return fresh, endpoint


def try_bind(socket: zmq.Socket, endpoint: str) -> bool:
    """Bind, or False while the endpoint is still taken (a TCP port is free once ZMQ closed the old socket in the
    background; libzmq binds a leftover ipc path at once)."""
    try:
        socket.bind(endpoint)
        return True
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EADDRINUSE:
            raise
        return False


def bind_blocking(socket: zmq.Socket, endpoint: str, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not try_bind(socket, endpoint):
        if time.monotonic() >= deadline:
            raise zmq.ZMQError(zmq.EADDRINUSE, f"{endpoint} still in use after {timeout_s} s")
        time.sleep(0.01)
