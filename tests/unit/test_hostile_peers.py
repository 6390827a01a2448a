"""Live peers that send every malformed kind of tests/hostile_messages.py over the real sockets: a backup store
process (`python -m ft.kv_store`, as the controller starts it) and an FT controller. Each goes on serving: the
store answers stats, takes a valid write and returns its rows, and has counted every malformed message; the
controller answers status and takes valid heartbeats. Before, one `ReqSlots(start=2**50)` ended the store."""

import os
import subprocess
import sys
import time

import msgspec
import numpy as np
import pytest
import zmq

from tests import hostile_messages as hostile
from ft.controller import FtController
from ft.kv_backup import KvBackupSender, fetch_kv, slots_of_requests, store_stats
from ft.messages import Heartbeat, encode

G = hostile.G


def wait_for(predicate, timeout_s: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def store(tmp_path):
    push, fetch = f"ipc://{tmp_path}/push", f"ipc://{tmp_path}/fetch"
    process = subprocess.Popen([sys.executable, "-m", "ft.kv_store", "--push", push, "--fetch", fetch,
                                "--parent-pid", str(os.getpid())])
    try:
        wait_for(lambda: store_stats(fetch), what="the store's first answer")
        yield process, push, fetch
    finally:
        process.kill()
        process.wait(timeout=10)


def ask(endpoint: str, frames: list[bytes]) -> list[bytes]:
    """One request on a fresh REQ socket; the reply must come (a REP socket wedged by a request gives none)."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send_multipart(frames)
        assert socket.poll(5000), "the store did not answer"
        return socket.recv_multipart()
    finally:
        socket.close()


def test_a_live_store_survives_every_malformed_message_and_still_serves(store):
    process, push, fetch = store
    writer = zmq.Context.instance().socket(zmq.PUSH)
    writer.setsockopt(zmq.LINGER, 0)
    writer.connect(push)
    for layer in range(G.num_layers):  # the store learns G, so every geometry rule applies
        writer.send_multipart(hostile.write(slots=(1, 2), layer=layer, seq=layer, seed=layer))
    stream = [frames for frames in hostile.STREAM.values() if frames]  # (ZMQ sends no message of no frames)
    for frames in stream:
        writer.send_multipart(frames)
    for frames in hostile.REQUESTS.values():
        ask(fetch, frames)
    expected = len(stream) + len(hostile.REQUESTS)
    stats = wait_for(lambda: (s := store_stats(fetch)) and s["malformed"] >= expected and s, what="the counts")
    assert (stats["malformed"], stats["failed"], stats["writes"]) == (expected, 0, G.num_layers)
    assert process.poll() is None

    sender = KvBackupSender(push, worker=1)  # a valid write of other slots, then its rows back
    sender.geometry, sender.heads = G, (0, G.num_kv_heads)
    written = [np.random.default_rng(layer).integers(0, 2**16, (2, G.num_kv_heads, G.head_dim)).astype(np.uint16)
               for layer in range(G.num_layers)]
    for layer, rows in enumerate(written):
        assert sender.write(layer, np.array([7, 9]), rows, rows + 1)
    assert sender.request_slots(["r"], [0], [2], np.array([7, 9]))
    wait_for(lambda: store_stats(fetch)["request_maps"] == 1, what="the valid request map")
    k, v, found = fetch_kv(fetch, 0, (0, G.num_kv_heads), np.array([9, 7, 5]))
    assert found.tolist() == [True, True, False]
    for layer, rows in enumerate(written):
        assert np.array_equal(k[layer, :2], rows[::-1]) and np.array_equal(v[layer, :2], rows[::-1] + 1)
    assert {rid: s.tolist() for rid, s in slots_of_requests(fetch, {"r": 8}).items()} == {"r": [7, 9]}
    final = store_stats(fetch)
    assert (final["malformed"], final["failed"], final["writes"]) == (expected, 0, 2 * G.num_layers)
    sender.close()
    writer.close()


def test_a_live_controller_survives_every_malformed_report_and_control_request(tmp_path):
    controller = FtController(f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/ctl", 2, interval_s=0.05, timeout_s=5.0,
                              parent_pid=os.getpid(), enable_fault_injection=False)
    context = zmq.Context.instance()
    reporter = context.socket(zmq.PUSH)
    reporter.setsockopt(zmq.LINGER, 0)
    reporter.connect(f"ipc://{tmp_path}/hb")
    try:
        for (frame,) in hostile.REPORTS.values():
            reporter.send(frame)
        reporter.send(encode(Heartbeat(1, os.getpid(), 0, 7, kv_slots=64)))
        wait_for(lambda: controller.step() or controller.receiver.dropped == len(hostile.REPORTS), what="reports")
        answers = []
        for raw in [*hostile.CONTROL.values(), b'{"op": "status"}']:
            client = context.socket(zmq.REQ)
            client.setsockopt(zmq.LINGER, 0)
            client.connect(f"ipc://{tmp_path}/ctl")
            client.send(raw)
            wait_for(lambda: controller.step() or client.poll(0), what="the controller's answer")
            answers.append(msgspec.json.decode(client.recv()))
            client.close()
        *refused, status = answers
        assert all(reply["code"] == 400 for reply in refused)
        assert status["malformed_messages"] == len(hostile.REPORTS) + len(hostile.CONTROL)
        assert status["workers"][1]["pid"] == os.getpid() and controller.kv_slots == 64
        assert controller.dropped.failed == 0
    finally:
        reporter.close()
        controller.receiver.close()
        controller.control.close()

