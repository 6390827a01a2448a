"""Keep the node's KV backup store running beside the FT controller, and say how it is doing.

The store is a child process of the controller (`python -m ft.kv_store`). When it dies, serving goes on: the
workers' non-blocking senders drop what they cannot queue, and `/ft/status` reports the backup as degraded (a
failure then recomputes the lost heads' KV). With `--ft-respawn` the keeper starts a fresh store at once; the
workers' ZMQ sockets reconnect by themselves, and the controller asks every worker to re-send the KV it holds
(`BackupResync`), so the new store is complete again after one pass.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from ft.kv_backup import store_stats

logger = logging.getLogger("sglang_ft.controller")


class KvStoreKeeper:
    def __init__(self, push_endpoint: str, fetch_endpoint: str, respawn: bool, secret_file: str = ""):
        self.push_endpoint = push_endpoint
        self.secret_file = secret_file  # its TCP endpoints are keyed like the controller's (ft/sockets.py)
        self.fetch_endpoint = fetch_endpoint
        self.respawn = respawn
        self.restarts = 0
        self.events: list[dict] = []
        self.started = time.monotonic()
        self.process: subprocess.Popen | None = None
        self._start()

    def _event(self, event: str) -> None:
        self.events.append({"event": event, "pid": self.process.pid if self.process else None,
                            "at_s": round(time.monotonic() - self.started, 3)})

    def _start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "ft.kv_store", "--push", self.push_endpoint,
                                         "--fetch", self.fetch_endpoint, "--parent-pid", str(os.getpid()),
                                         "--secret-file", self.secret_file])
        self._event("started")
        logger.info("sglang-ft controller: KV backup store pid %d", self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> bool:
        """Called every controller step: notice a dead store, restart it under --ft-respawn; True if restarted."""
        if self.process is None or self.alive:
            return False
        code = self.process.returncode
        self._event(f"died (exit {code})")
        logger.error("sglang-ft controller: the KV backup store (pid %d) died with %s; backup is degraded",
                     self.process.pid, code)
        self.process = None
        if not self.respawn:
            return False
        self.restarts += 1
        self._start()
        return True

    def status(self) -> dict:
        return {
            "state": "healthy" if self.alive else "degraded",
            "pid": self.process.pid if self.alive else None,
            "restarts": self.restarts,
            "respawn": self.respawn,
            "events": self.events,
            "store": store_stats(self.fetch_endpoint) if self.alive else None,
        }

    def stop(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait(timeout=5)
