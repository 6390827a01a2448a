"""The sockets across nodes (`ft/sockets.py`): keys derived from the deployment secret, the same on every node; a
CURVE server answers only clients holding them and counts every connection it refuses; ipc stays plain."""

import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from ft.ports import free_port
from ft.sockets import CurveKeys, bind_socket, connect_socket, load_keys, read_secret, refused_connections, request

SECRET = b"0123456789abcdef0123456789abcdef"
KEYS = CurveKeys.from_secret(SECRET)
NO_ANSWER_MS = 600


def keys_on_another_node(path) -> dict:
    """The keys another process (a node of its own) derives from the secret file at `path`."""
    code = ("import dataclasses, json, sys; from ft.sockets import load_keys; "
            "print(json.dumps({k: v.decode() for k, v in dataclasses.asdict(load_keys(sys.argv[1])).items()}))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    return {k: v.encode() for k, v in json.loads(out).items()}


def refused_since(before: int, at_least: int = 1, timeout_s: float = 5.0) -> int:
    """Refusals counted since `before`, once there are `at_least` (the monitor thread counts them shortly after)."""
    deadline = time.monotonic() + timeout_s
    while refused_connections() - before < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return refused_connections() - before


def ask(endpoint: str, keys: CurveKeys | None, server: zmq.Socket) -> bytes | None:
    """One request from a fresh client (`ft.sockets.request`, bounded both ways); the server echoes whatever reaches
    it. None: no answer."""
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(request, endpoint, [b"status"], NO_ANSWER_MS, keys)
        if server.poll(NO_ANSWER_MS):
            server.send(server.recv())
        reply = asked.result(timeout=10 * NO_ANSWER_MS / 1e3)  # a send that blocks forever fails here, not at 900 s
    return None if reply is None else reply[0]


@pytest.fixture
def server():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    socket = bind_socket(zmq.REP, endpoint, KEYS)
    yield endpoint, socket
    socket.close()


def test_every_node_with_the_same_secret_file_derives_the_same_keys(tmp_path):
    (tmp_path / "a").write_bytes(SECRET + b"\n")  # one node's file ends in a newline, the other's does not
    (tmp_path / "b").write_bytes(SECRET)
    node0, node1 = keys_on_another_node(tmp_path / "a"), keys_on_another_node(tmp_path / "b")
    assert node0 == node1 == dataclasses.asdict(KEYS)
    assert len({KEYS.server_public, KEYS.client_public, KEYS.server_secret, KEYS.client_secret}) == 4
    assert zmq.curve_public(KEYS.server_secret) == KEYS.server_public  # each pair is a Curve25519 keypair
    assert zmq.curve_public(KEYS.client_secret) == KEYS.client_public
    other = CurveKeys.from_secret(SECRET[:-1] + b"X")  # one byte apart: nothing in common
    assert not {other.server_public, other.client_public} & {KEYS.server_public, KEYS.client_public}


def test_the_holder_of_the_secret_round_trips_and_is_not_counted(server):
    endpoint, socket = server
    before = refused_connections()
    assert ask(endpoint, KEYS, socket) == b"status"
    time.sleep(0.2)
    assert refused_connections() == before


@pytest.mark.parametrize("client", ["no key", "another secret", "the server's key but a foreign client key"])
def test_a_client_without_the_secret_gets_no_answer_and_is_counted(server, client):
    endpoint, socket = server
    foreign = CurveKeys.from_secret(b"not-the-deployment-secret")
    keys = {"no key": None, "another secret": foreign,
            # as if the server's public key leaked: the ZAP handler still refuses a client key not derived from it
            "the server's key but a foreign client key": dataclasses.replace(foreign,
                                                                            server_public=KEYS.server_public)}[client]
    before = refused_connections()
    assert ask(endpoint, keys, socket) is None
    assert refused_since(before) >= 1
    assert ask(endpoint, KEYS, socket) == b"status"  # the server goes on serving its own


def test_bytes_that_are_no_zmq_are_dropped_and_the_server_goes_on(server):
    import socket as plain

    endpoint, socket = server
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with plain.create_connection((host, int(port)), timeout=2) as conn:
        conn.sendall(b"GET /ft/status HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        received = b""
        try:  # a ZMTP greeting at most, then the server hangs up (a timeout here fails the test)
            while chunk := conn.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP" not in received and b"status" not in received
    assert ask(endpoint, KEYS, socket) == b"status"


def test_every_socket_pair_the_runtime_uses_carries_traffic_under_curve():
    """heartbeats and KV (PUSH/PULL), orders (PUB/SUB); REQ/REP is above."""
    port = free_port()
    pull = bind_socket(zmq.PULL, f"tcp://127.0.0.1:{port}", KEYS)
    push = connect_socket(zmq.PUSH, f"tcp://127.0.0.1:{port}", KEYS)
    push.send_multipart([b"beat", b"\x00" * 4096])
    assert pull.poll(5000) and pull.recv_multipart() == [b"beat", b"\x00" * 4096]
    port = free_port()
    pub = bind_socket(zmq.PUB, f"tcp://127.0.0.1:{port}", KEYS)
    sub = connect_socket(zmq.SUB, f"tcp://127.0.0.1:{port}", KEYS)
    outsider = connect_socket(zmq.SUB, f"tcp://127.0.0.1:{port}", None)
    deadline = time.monotonic() + 5
    while not sub.poll(50) and time.monotonic() < deadline:  # a subscription takes a moment to reach the PUB
        pub.send(b"regroup")
    assert sub.recv() == b"regroup"
    assert not outsider.poll(200)  # published all along, never delivered to a subscriber without the key
    for socket in (pull, push, pub, sub, outsider):
        socket.close()


def test_ipc_endpoints_stay_plain(tmp_path):
    """Same host, in a runtime directory only its user can enter: no keys needed, even where the process has them."""
    endpoint = f"ipc://{tmp_path}/control"
    socket = bind_socket(zmq.REP, endpoint, KEYS)
    try:
        assert ask(endpoint, None, socket) == b"status"
    finally:
        socket.close()


def test_a_closed_server_stops_being_watched_and_its_port_binds_again(server):
    endpoint, socket = server
    socket.close()
    time.sleep(0.2)  # the monitor thread sees it stop
    again = bind_socket(zmq.REP, endpoint, KEYS)
    try:
        assert ask(endpoint, KEYS, again) == b"status"
    finally:
        again.close()


@pytest.mark.parametrize("content, message", [(None, "cannot read it"), (b"short\n", "holds 5 bytes"),
                                              (b"   \n", "holds 0 bytes")])
def test_a_bad_secret_file_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_secret(str(path))
    with pytest.raises(ValueError, match=message):
        load_keys(str(path))
