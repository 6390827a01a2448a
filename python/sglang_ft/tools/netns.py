"""Several "nodes" on one machine: Linux network namespaces joined by veth pairs to one bridge.

Multi-node TP needs machines that can fail one at a time: a whole node killed (every process in it at once) or cut
off (its link down). Each node here is a network namespace (and a /dev/shm of its own) with its own address (10.77.<net>.<i+1>); its veth's
other end sits on a bridge in the root namespace, which also gets an address, so the test process can reach every
node. `kill()` SIGKILLs every process in a node's namespace; `cut()` takes its link down (its processes live on,
unreachable), `mend()` brings it back.

Needs CAP_NET_ADMIN (root in a container that allows it) and iproute2; `NetnsNodes.unavailable()` says why not.

    with NetnsNodes(2) as nodes:
        nodes.popen(1, ["python", "-m", "sglang.launch_server", ...])
        nodes.cut(1)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass(frozen=True)
class Node:
    index: int
    namespace: str
    address: str  # its address on the bridge
    host_veth: str  # the veth end on the bridge (down = the node is cut off)


class NetnsNodes:
    """`count` namespaces on one bridge, removed again on exit (also after an error)."""

    def __init__(self, count: int, net: int = 77):
        if not 1 <= count <= 8:
            raise ValueError(f"count must be in [1, 8], got {count}")
        tag = uuid.uuid4().hex[:6]
        subnet = int(tag[:2], 16)
        self.bridge = f"ftbr{tag}"
        self.host_address = f"10.{net}.{subnet}.254"
        # the owner's pid in each name: remove_stale() deletes the nodes of a test process that was killed
        self.nodes = [Node(i, f"ftns-{os.getpid()}-{tag}-{i}", f"10.{net}.{subnet}.{i + 1}", f"ftv{tag}{i}")
                      for i in range(count)]

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None when they can."""
        if shutil.which("ip") is None:
            return "iproute2 (`ip`) is not installed"
        probe = f"ft-probe-{uuid.uuid4().hex[:6]}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace ({made.stderr.strip() or 'no privilege'})"
        _ip("netns", "del", probe, check=False)
        return None

    @staticmethod
    def remove_stale() -> list[str]:
        """Delete the nodes (and their bridges) left by processes that died without cleaning up; returns them."""
        removed = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name.split("-")
            if len(parts) == 4 and parts[0] == "ftns" and parts[1].isdigit() and not _alive(int(parts[1])):
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    _kill(int(pid))
                _ip("netns", "del", name, check=False)
                _ip("link", "del", f"ftbr{parts[2]}", check=False)
                removed.append(name)
        return removed

    def __enter__(self) -> "NetnsNodes":
        self.remove_stale()
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            _ip("netns", "add", node.namespace)
            _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            _ip("link", "set", node.host_veth, "master", self.bridge)
            _ip("link", "set", node.host_veth, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Kill what runs in the nodes and delete them (deleting a namespace deletes its veth pair)."""
        for node in self.nodes:
            self.kill(node.index)
            _ip("netns", "del", node.namespace, check=False)
            _ip("link", "del", node.host_veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def command(self, index: int, argv: list[str]) -> list[str]:
        """`argv` run inside node `index`'s network namespace, with a /dev/shm of its own: SGLang tells ranks on
        the same node from others by whether they see each other's shared memory."""
        private_shm = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
        return ["ip", "netns", "exec", self.nodes[index].namespace, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", private_shm, "node", *argv]

    def popen(self, index: int, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` in node `index`. Gloo and SGLang are pointed at the node's interface: by default gloo binds
        the address the hostname resolves to (a loopback one) and SGLang looks for the interface that routes to the
        internet (none here), neither reachable from the other nodes."""
        env = {**(os.environ if env is None else env), "GLOO_SOCKET_IFNAME": "eth0",
               "SGLANG_HOST_IP": self.nodes[index].address}
        return subprocess.Popen(self.command(index, argv), env=env, **kwargs)

    def pids(self, index: int) -> list[int]:
        listed = _ip("netns", "pids", self.nodes[index].namespace, check=False)
        return [int(pid) for pid in listed.stdout.split()]

    def kill(self, index: int) -> list[int]:
        """SIGKILL every process in node `index` at once (a node that lost power); returns their pids."""
        return [pid for pid in self.pids(index) if _kill(pid)]

    def cut(self, index: int) -> None:
        """Take node `index`'s link down: its processes run on and can reach no other node."""
        _ip("link", "set", self.nodes[index].host_veth, "down")

    def mend(self, index: int) -> None:
        _ip("link", "set", self.nodes[index].host_veth, "up")
