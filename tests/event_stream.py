"""Test helpers that follow a live server's fault events (`/ft/events`, the PUB socket) and probes in threads."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests
from sglang_ft.ctl_events import read_events


class EventStream:
    """`GET /ft/events` followed in a thread; `events` fills as they come."""

    def __init__(self, url: str, last_id: int | None = None):
        headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        self.response = requests.get(f"{url}/ft/events", headers=headers, stream=True, timeout=(10, 600))
        self.response.raise_for_status()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in read_events(self.response):
                self.events.append(event)
        except (requests.RequestException, AttributeError, ValueError):  # closed by the test
            pass

    def wait_for(self, predicate, timeout_s: float = 120.0, what: str = "events") -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.events):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; got {self.events}"
            time.sleep(0.05)
        return list(self.events)

    def close(self) -> None:
        """Hang up at once. The reader thread sits in recv until the next event or the server's 15 s keepalive, and
        holds the response buffer's lock there: a plain close waited for it (up to 15 s a close). Shutting the
        socket down first ends the read."""
        connection = self.response.raw.connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the server
                pass
        self.response.close()


class PubEvents:
    """The `--ft-events-endpoint` PUB socket, subscribed (with the deployment's keys where it has a secret)."""

    def __init__(self, endpoint: str, keys=None):
        import zmq

        from ft.sockets import connect_socket

        self.socket = connect_socket(zmq.SUB, endpoint, keys)
        self.events: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(100):
                topic, data = self.socket.recv_multipart()
                assert topic == b"sglang_ft"
                self.events.append(json.loads(data))

    def close(self) -> None:
        self._stop.set()
        time.sleep(0.2)
        self.socket.close()


class ProbeWatch:
    """Polls HTTP probe paths until stopped and records every status code (a connection error counts as 0)."""

    def __init__(self, url: str, paths: tuple[str, ...], interval_s: float = 0.2):
        self.url, self.paths, self.interval_s = url, paths, interval_s
        self.codes: dict[str, list[int]] = {path: [] for path in paths}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(path,), daemon=True) for path in paths]
        for thread in self._threads:
            thread.start()

    def _poll(self, path: str) -> None:
        while not self._stop.is_set():
            try:
                self.codes[path].append(requests.get(f"{self.url}{path}", timeout=60).status_code)
            except requests.RequestException:
                self.codes[path].append(0)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        return self.codes


def stalled_client(url: str) -> socket.socket:
    """A client of `/ft/events` that reads nothing, with a tiny window (its events pile up on the server)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    client.connect((host, int(port)))
    client.sendall(f"GET /ft/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return client
