"""Run `python -m sglang.launch_server` as a child process: start, wait until healthy, stop it and all its children.

Shared by the demo, the tests and the benchmarks so every one of them launches SGLang the way a user does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ft.ports import free_port


def popen_launcher(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The launch a user runs: the command in a new session, its output to the log."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class PortTaken(RuntimeError):
    """Another process bound the chosen port first (SGLang picks its own internal ports at launch)."""


@dataclass
class ServerProcess:
    """One SGLang server on 127.0.0.1, its log file, and how long it took to become healthy."""

    model_path: str
    tp_size: int = 1
    ft: bool = False
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    log_path: Path | None = None
    startup_s: float = 0.0
    proc: subprocess.Popen | None = None
    stragglers: list[int] = field(default_factory=list)  # left running after the launcher exited at the last stop
    # how the command is started: `popen_launcher` (the real command) unless a test passes its fork server's
    launcher: Callable[[list[str], dict[str, str], Path], subprocess.Popen] = popen_launcher

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model_path)]
        cmd += ["--tp-size", str(self.tp_size), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--ft"] if self.ft else []
        return cmd + list(self.extra_args)

    def start(self, timeout_s: float = 300.0, attempts: int = 3) -> "ServerProcess":
        """Launch and wait until healthy; a port taken between choosing and binding it is retried on another."""
        chosen_port = self.port
        for attempt in range(attempts):
            try:
                return self._start_once(timeout_s)
            except PortTaken:
                if chosen_port or attempt == attempts - 1:
                    raise
                self.port, self.log_path = 0, None
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> "ServerProcess":
        self.port = self.port or free_port()
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sglang-ft-server-{self.port}.log"
        env = dict(os.environ, PYTHONWARNINGS="ignore", **self.extra_env)
        # `stop` signals the whole group, so the launcher sees its schedulers exit and runs SGLang's crash path,
        # which sleeps 5 s for py-spy and CUDA core dumps first: nothing to dump here, and 5 s per server stopped.
        for flag in ("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH"):
            env.setdefault(flag, "false")
        started = time.monotonic()
        self.proc = self.launcher(self.command(), env, self.log_path)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if "address already in use" in self.log_text():
                raise PortTaken(f"port {self.port} was taken before the server bound it")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f}s; log:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left; what was still running once the launcher
        had exited is kept in `stragglers` (a clean shutdown leaves none)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                self.stragglers = leftover_processes(self.proc.pid, wait_s=5.0 if sig == signal.SIGTERM else 0.0)
                _reap_group(self.proc.pid)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def leftover_processes(process_group: int, wait_s: float = 0.0) -> list[int]:
    """Live (not zombie) processes of a process group, after giving them up to `wait_s` to exit."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == process_group and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except (psutil.Error, ProcessLookupError):
                continue
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _reap_group(pgid: int) -> None:
    """Kill stragglers of the group (scheduler processes outliving the launcher)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
