"""The tokenizer manager's request journal when a new TP rank 0 is elected while the old one is hung, not dead:
its connection stays open, so ZMQ's PUSH would keep handing it every other request. After `switch_rank0` it gets
none, and every unfinished request reaches the new rank 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import zmq
import zmq.asyncio

from sglang_ft.managers.io_struct import ReceivedTokens
from sglang_ft.managers.tokenizer_manager_components.sent_requests import RequestJournal

STALE_RANK0 = """
import sys, time, zmq
socket = zmq.Context().socket(zmq.PULL)
socket.connect(sys.argv[1])
time.sleep(0.5)  # the handshake completes in ZMQ's I/O thread
print("connected", flush=True)
time.sleep(120)
"""


class FakeTokenizerManager:
    """What the journal uses of SGLang's TokenizerManager: its socket, its dispatch and its request states."""

    tokenizer_ipc_name = None  # one tokenizer: it binds the socket the schedulers connect to

    def __init__(self, socket):
        self.send_to_scheduler = socket
        self.rid_to_state: dict[str, SimpleNamespace] = {}

    def _dispatch_to_scheduler(self, obj) -> None:
        self.send_to_scheduler.send_pyobj(obj)  # not awaited, as SGLang's sock_send


def drain(socket, timeout_s: float = 1.0) -> list[str]:
    """Every message `socket` receives until it has been quiet for `timeout_s`."""
    got = []
    while socket.poll(int(timeout_s * 1000)):
        got.append(socket.recv_pyobj())
    return got


async def scenario(endpoint: str, stale_pid_holder: list) -> tuple[list[str], list[str], int]:
    context = zmq.asyncio.Context()
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    stale = subprocess.Popen([sys.executable, "-c", STALE_RANK0, endpoint], stdout=subprocess.PIPE, text=True)
    stale_pid_holder.append(stale.pid)
    assert stale.stdout.readline().strip() == "connected"
    os.kill(stale.pid, signal.SIGSTOP)  # the old rank 0 hangs: its socket stays connected
    new_rank0 = zmq.Context.instance().socket(zmq.PULL)
    new_rank0.connect(endpoint)
    await asyncio.sleep(0.3)  # both peers connected

    manager = FakeTokenizerManager(push)
    journal = RequestJournal()
    journal.tokenizer_manager = manager
    for i in range(10):
        rid = f"before-{i}"
        manager.rid_to_state[rid] = SimpleNamespace(finished=False, output_ids=list(range(i)))
        journal.sent[rid] = rid
        manager._dispatch_to_scheduler(rid)
    await asyncio.sleep(0.3)
    before = drain(new_rank0, 0.5)

    resent = await journal.switch_rank0(epoch=3)
    for i in range(10):
        manager._dispatch_to_scheduler(f"after-{i}")
    await asyncio.sleep(0.3)
    after = []
    deadline = time.monotonic() + 10
    while len(after) < resent + 11 and time.monotonic() < deadline:
        after += drain(new_rank0, 0.5)
        await asyncio.sleep(0.05)
    manager.send_to_scheduler.close(linger=0)
    new_rank0.close(linger=0)
    return before, after, resent


def test_a_hung_rank0_gets_nothing_after_the_switch_and_the_new_one_gets_everything(tmp_path):
    stale_pid: list[int] = []
    try:
        before, after, resent = asyncio.run(scenario(f"ipc://{tmp_path}/scheduler-input", stale_pid))
    finally:
        for pid in stale_pid:
            os.kill(pid, signal.SIGKILL)
    # without the switch, the hung rank 0 swallowed part of the requests (the bug this guards against)
    assert 0 < len(before) < 10
    assert resent == 10
    # the re-sends, then what the tokenizer manager received of each (output_rewind.py), then the new requests
    assert sorted(after[:10]) == [f"before-{i}" for i in range(10)]
    assert after[10] == ReceivedTokens(epoch=3, received={f"before-{i}": i for i in range(10)})
    assert after[11:] == [f"after-{i}" for i in range(10)]


def test_the_fresh_socket_binds_the_same_ipc_path_at_once(tmp_path):
    """libzmq leaves a closed socket's ipc file in place and unlinks it itself when binding: the switch must not
    wait for the file to go (it waited out a 2 s timeout at every rank-0 election)."""
    from sglang_ft.managers.tokenizer_manager_components.sent_requests import bind_when_free

    context = zmq.Context.instance()
    endpoint = f"ipc://{tmp_path}/to-scheduler"
    old = context.socket(zmq.PUSH)
    old.bind(endpoint)
    old.close(linger=0)
    fresh, peer = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    try:
        started = time.monotonic()
        asyncio.run(bind_when_free(fresh, endpoint))
        assert time.monotonic() - started < 0.5
        peer.connect(endpoint)
        fresh.send(b"request")
        assert peer.poll(5000) and peer.recv() == b"request"
    finally:
        fresh.close(linger=0)
        peer.close(linger=0)
