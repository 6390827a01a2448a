"""Every sglang-ft ZMQ socket is made here; those that cross nodes (tcp://) are authenticated and encrypted (CURVE).

The keys come from a deployment secret (`--ft-secret-file`): every node holding the same file derives the same
server and client keypairs, so nothing is exchanged at start-up. A server socket accepts only the client key derived
from the secret (this process's ZAP handler) and counts every ZMQ handshake it refuses: a foreign client key, a
different secret (the handshake does not decrypt), no CURVE at all, or a handshake broken off (bytes that are no ZMTP
at all are dropped by libzmq before any handshake, uncounted). ipc:// endpoints stay plain: same host, in a
runtime directory only the server's user can enter.

A process serves one deployment: it names its secret file once (`use_secret_file`, where its FT options are
published) and its sockets take `process_keys()`, rather than every caller threading keys down to each socket.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import zmq
from zmq.utils import z85

logger = logging.getLogger(__name__)
MIN_SECRET_BYTES = 16
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a socket's context to authenticate a peer
ZAP_DOMAIN = b"sglang-ft"
REFUSALS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "a client key not derived from the secret",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "no CURVE, or another secret",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed"}
REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class CurveKeys:
    """The deployment's two CURVE keypairs (Z85): the one every server socket holds, the one every client holds."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> "CurveKeys":
        return cls(*_keypair(secret, b"sglang-ft-server"), *_keypair(secret, b"sglang-ft-client"))


def _keypair(secret: bytes, label: bytes) -> tuple[bytes, bytes]:
    """(public, secret) derived from `secret`, one keypair per label (blake2b with the label as personalization;
    any 32 bytes are a Curve25519 secret key)."""
    raw = hashlib.blake2b(secret, digest_size=32, person=label).digest()
    secret_key = z85.encode(raw)
    return zmq.curve_public(secret_key), secret_key


def read_secret(path: str) -> bytes:
    """The secret in `path`, surrounding whitespace ignored (a trailing newline must not change the keys);
    ValueError saying what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"it holds {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed "
                         "(e.g. `openssl rand -hex 32 > FILE`, the same file on every node)")
    return secret


@lru_cache(maxsize=4)
def load_keys(path: str) -> CurveKeys:
    return CurveKeys.from_secret(read_secret(path))


_SECRET_FILE = ""


def use_secret_file(path: str) -> None:
    """Key this process's sockets across nodes with the secret in `path` ("": none, plain TCP)."""
    global _SECRET_FILE
    _SECRET_FILE = path


def process_keys() -> CurveKeys | None:
    """The keys of this process's deployment; read when a socket is made, after the launch checked the file."""
    return load_keys(_SECRET_FILE) if _SECRET_FILE else None


def _secured(endpoint: str, keys: CurveKeys | None) -> bool:
    return keys is not None and endpoint.startswith("tcp://")


def _socket(kind: int, linger_ms: int, options: dict | None) -> zmq.Socket:
    socket = zmq.Context.instance().socket(kind)
    socket.setsockopt(zmq.LINGER, linger_ms)
    for option, value in (options or {}).items():
        socket.setsockopt(option, value)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    return socket


def bind_socket(kind: int, endpoint: str, keys: CurveKeys | None = None, *, linger_ms: int = 0,
                options: dict | None = None) -> zmq.Socket:
    """A socket of `kind` bound at `endpoint`; over TCP with `keys`, a CURVE server that admits only the client key
    derived from the same secret."""
    socket = _socket(kind, linger_ms, options)
    if _secured(endpoint, keys):
        guard = _guard()
        socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
        guard.watch(socket, endpoint, keys.client_public)
    socket.bind(endpoint)
    return socket


def connect_socket(kind: int, endpoint: str, keys: CurveKeys | None = None, *, linger_ms: int = 0,
                   options: dict | None = None) -> zmq.Socket:
    """A socket of `kind` connected to `endpoint` (a SUB subscribes to everything); over TCP with `keys`, a CURVE
    client of the server keyed by the same secret."""
    socket = _socket(kind, linger_ms, options)
    if _secured(endpoint, keys):
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
    socket.connect(endpoint)
    return socket


def request(endpoint: str, frames: list[bytes], timeout_ms: int, keys: CurveKeys | None = None) -> list[bytes] | None:
    """One request/reply on a fresh REQ socket, bounded both ways; None when no answer came in `timeout_ms`.

    The send is bounded too: a REQ socket whose CURVE handshake was refused has no peer left, and a plain send on it
    would block forever (a misconfigured node must not wedge the caller's thread).
    """
    socket = connect_socket(zmq.REQ, endpoint, keys, options={zmq.SNDTIMEO: timeout_ms})
    try:
        try:
            socket.send_multipart(frames)
        except zmq.Again:
            return None
        return socket.recv_multipart() if socket.poll(timeout_ms) else None
    finally:
        socket.close()


def refused_connections() -> int:
    """Connections this process's CURVE servers refused so far (a client that keeps retrying counts each time)."""
    guard = _GUARDS.get(zmq.Context.instance())
    return guard.refused if guard is not None else 0


class _Guard:
    """This process's ZAP handler and the handshake monitors of its CURVE servers, served by one daemon thread."""

    def __init__(self, context: zmq.Context):
        self.refused = 0
        self._allowed: set[bytes] = set()  # raw 32-byte client public keys
        self._endpoints: dict[zmq.Socket, str] = {}  # monitor -> the endpoint its server is bound at
        self._new: queue.Queue = queue.Queue()
        self._last_log: dict[str, float] = {}
        # bound before any CURVE server exists: libzmq admits every client while no ZAP handler is bound
        self._zap = context.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        threading.Thread(target=self._run, name="ft-zap", daemon=True).start()

    def watch(self, server: zmq.Socket, endpoint: str, client_public: bytes) -> None:
        self._allowed.add(z85.decode(client_public))
        monitor = server.get_monitor_socket(sum(REFUSALS) | zmq.EVENT_MONITOR_STOPPED)
        self._new.put((monitor, endpoint))  # handed to the thread; events queue in the monitor until it polls

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        while True:
            while not self._new.empty():
                monitor, endpoint = self._new.get()
                self._endpoints[monitor] = endpoint
                poller.register(monitor, zmq.POLLIN)
            for socket, _ in poller.poll(50):
                if socket is self._zap:
                    self._answer(socket.recv_multipart())
                else:
                    self._on_event(socket, poller)

    def _answer(self, request: list[bytes]) -> None:
        """ZAP 1.0: [version, request id, domain, address, identity, mechanism, credentials...] -> a status."""
        version, request_id, _domain, _address, _identity, mechanism, *credentials = request
        # the mechanism is the server socket's: a NULL request comes from a plain (ipc) socket, never from a client
        # skipping CURVE, whose handshake fails before ZAP is asked
        allowed = mechanism != b"CURVE" or (len(credentials) == 1 and credentials[0] in self._allowed)
        status = (b"200", b"OK") if allowed else (b"400", b"client key not derived from --ft-secret-file")
        self._zap.send_multipart([version, request_id, *status, b"", b""])

    def _on_event(self, monitor: zmq.Socket, poller: zmq.Poller) -> None:
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(monitor)["event"]
        endpoint = self._endpoints[monitor]
        if event == zmq.EVENT_MONITOR_STOPPED:  # its server was closed
            poller.unregister(monitor)
            monitor.close()
            del self._endpoints[monitor]
            return
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log.get(endpoint, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
            self._last_log[endpoint] = now
            logger.warning("sglang-ft: refused a connection to %s (%s; %d refused so far): is --ft-secret-file the "
                           "same on every node?", endpoint, REFUSALS.get(event, event), self.refused)


_GUARDS: dict[zmq.Context, _Guard] = {}
_GUARDS_LOCK = threading.Lock()


def _guard() -> _Guard:
    context = zmq.Context.instance()  # a forked child gets a context (and so a guard) of its own
    with _GUARDS_LOCK:
        if context not in _GUARDS:
            _GUARDS[context] = _Guard(context)
        return _GUARDS[context]
