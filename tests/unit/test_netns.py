"""The multi-node harness (tools/netns.py): namespaces that reach each other, a cut link, a whole node killed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_ft.tools.netns import NetnsNodes

WHY_NOT = NetnsNodes.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")

ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.sendall(b"hello from " + sys.argv[1].encode())
    connection.close()
"""

CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7000), timeout=1.5) as connection:
        print(connection.recv(100).decode())
except OSError as error:
    print(f"unreachable: {error}")
"""


def reach(nodes: NetnsNodes, source: int | None, address: str) -> str:
    argv = [sys.executable, "-c", CONNECT, address]
    command = argv if source is None else nodes.command(source, argv)
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()


def test_nodes_reach_each_other_a_cut_isolates_and_a_kill_takes_every_process():
    with NetnsNodes(2) as nodes:
        target = nodes.nodes[1].address
        server = nodes.popen(1, [sys.executable, "-c", ECHO_SERVER, target], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        assert reach(nodes, 0, target) == f"hello from {target}"  # node to node
        assert reach(nodes, None, target) == f"hello from {target}"  # the test process (root namespace) too

        nodes.cut(1)
        assert reach(nodes, 0, target).startswith("unreachable")
        assert server.poll() is None  # alive, just cut off
        nodes.mend(1)
        assert reach(nodes, 0, target) == f"hello from {target}"

        assert server.pid in nodes.pids(1) and nodes.pids(0) == []
        assert server.pid in nodes.kill(1)
        assert server.wait(timeout=10) == -9
        namespaces = [node.namespace for node in nodes.nodes]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in namespaces)  # removed on exit


def test_nodes_left_by_a_killed_test_process_are_removed_by_the_next_one():
    owner = subprocess.Popen([sys.executable, "-c", """
import sys, time
from sglang_ft.tools.netns import NetnsNodes
nodes = NetnsNodes(1).__enter__()
print(nodes.nodes[0].namespace, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    left = owner.stdout.readline().strip()
    owner.kill()  # no chance to clean up
    owner.wait(timeout=10)
    assert left in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert left in NetnsNodes.remove_stale()
    assert left not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
