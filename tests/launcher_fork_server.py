"""Start `python -m sglang.launch_server` for the server tests from a fork server that imported SGLang's launcher once.

A launch here spends about 13 of its 20 seconds in the launcher importing SGLang (its server arguments, the HTTP
server and everything they pull in); over a dozen launches that is minutes of `make test`. The fork server imports
what the launcher imports, in the launcher's order (`sglang.launch_server`'s imports, `load_plugins()`, which applies
sglang-ft's hooks, then the HTTP server that `run_server` imports), and forks one child per launch, which runs
`sglang.launch_server` as `__main__` with the launch's argv, environment and log, in its own session: the process a
user's `python -m sglang.launch_server` would be after its imports, a process with no threads (checked at start).
The only step that runs in another order is `prepare_server_args`, before instead of after the HTTP server's import.
Launches that are about the command line itself (the ecosystem's server, the spawned GPU-path server, the two-node
cluster, the demo and the benchmarks) still run the real command.

The child is this fork server's child, not the test's: `LaunchedProcess` answers `poll`/`wait` as `subprocess.Popen`
does by asking the fork server to reap it (a launcher nobody polled stays a zombie, as under a careless parent).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOAD = ["sglang.srt.arg_groups.overrides", "sglang.srt.plugins", "sglang.srt.server_args", "sglang.srt.utils",
           "sglang.srt.utils.common"]  # sglang.launch_server's own imports, before its `load_plugins()`


class LaunchedProcess:
    """The part of `subprocess.Popen` a `ServerProcess` uses, for a launcher forked by the fork server."""

    def __init__(self, server: "LauncherForkServer", pid: int, args: list[str]):
        self.server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode


class LauncherForkServer:
    """The test side: starts the fork server (its imports run beside the unit tests), then launches through it."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.lock = threading.Lock()
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.launcher_fork_server"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_path, "w"))
        self.ready = False

    def request(self, message: dict) -> dict:
        with self.lock:
            if not self.ready:
                self._read_reply()  # {"ready": true}, once the imports are done
                self.ready = True
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
            return self._read_reply()

    def _read_reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher fork server exited; its log:\n{self.log_path.read_text()[-4000:]}")
        return json.loads(line)

    def __call__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> LaunchedProcess:
        """Launch `cmd` (`python -m sglang.launch_server ...`), as `ServerProcess` does with `subprocess.Popen`."""
        assert cmd[1:3] == ["-m", "sglang.launch_server"], cmd
        reply = self.request({"op": "start", "argv": cmd[3:], "env": env, "log": str(log_path), "cwd": os.getcwd()})
        return LaunchedProcess(self, reply["pid"], cmd)

    def close(self) -> None:
        self.proc.stdin.close()  # the fork server exits at end of input
        self.proc.wait(timeout=30)


def _serve(requests_in, replies_out) -> dict:
    """The fork server's loop; returns (in a forked child only) the launch that child is to run."""
    for line in requests_in:
        message = json.loads(line)
        reply: dict
        if message["op"] == "start":
            pid = os.fork()
            if pid == 0:
                return message
            reply = {"pid": pid}
        elif message["op"] == "poll":
            done, status = os.waitpid(message["pid"], os.WNOHANG)
            reply = {"returncode": os.waitstatus_to_exitcode(status) if done else None}
        else:
            reply = {"error": f"unknown op {message['op']!r}"}
        replies_out.write(json.dumps(reply).encode() + b"\n")
        replies_out.flush()
    sys.exit(0)


def _become_the_launcher(launch: dict, protocol: list) -> None:
    """In the forked child: the launch's session, directory, environment, log and argv, as `Popen` would set them."""
    for stream in protocol:
        stream.close()
    os.setsid()
    os.chdir(launch["cwd"])
    for name in set(os.environ) - set(launch["env"]):
        del os.environ[name]
    os.environ.update(launch["env"])
    log = os.open(launch["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.argv = ["-m", *launch["argv"]]


def main() -> None:
    # The protocol moves off fds 0 and 1, so a launcher never inherits it as its standard input or output.
    requests_in, replies_out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    for module in PRELOAD:
        __import__(module)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.entrypoints.http_server  # noqa: F401  (what `run_server` imports first)

    # setproctitle finds the memory of argv and the environment at its first use, and not once the environment was
    # changed: a launch's own environment would leave its workers without their `sglang::scheduler_TP<r>` titles.
    import setproctitle

    setproctitle.getproctitle()
    names = [thread.name for thread in threading.enumerate()]
    assert names == [threading.main_thread().name], f"threads after the imports would not survive a fork: {names}"
    replies_out.write(b'{"ready": true}\n')
    replies_out.flush()
    launch = _serve(requests_in, replies_out)
    _become_the_launcher(launch, [requests_in, replies_out])
    import runpy

    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
