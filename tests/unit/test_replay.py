"""benchmark/replay.py against real `sleep` processes standing for workers and an in-process fake of `/ft/status` and
`/ft/rejoin` (no SGLang server): the signals land on the right pids at the trace's times, rejoins are POSTed with the
key, gone processes are skipped, pids can come from a callable, and a bad trace exits 2 naming its line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from tests.fake_http import serving
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ft.controller_state import ControllerState
from ft.failure_detector import FailureDetector
from ft.fault_trace import FaultEvent, FaultTrace, TraceHeader, dumps_trace
from ft.membership import Membership
from sglang_ft.entrypoints.ft_runtime import WorkerRequest

from benchmark import replay as rp

PATH = Path(rp.__file__)

KEY = "sk-replay-test"


def _sleeper(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv) or ["sleep", "60"])


def _trace(*events: tuple[float, int, str], tp_size: int = 4, window_s: float = 100.0) -> FaultTrace:
    return FaultTrace(TraceHeader("test", window_s, tp_size, None, 1), tuple(FaultEvent(*e) for e in events))


def _state(pid: int, timeout_s: float = 5.0, want: str | None = None) -> str:
    """The process's state, polled until it is `want` (a signal lands when the kernel next runs the process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = psutil.Process(pid).status()
        if want is None or status == want or time.monotonic() > deadline:
            return status
        time.sleep(0.01)


class FakeFtServer:
    """`/ft/status` in the controller's own shape (a real `ControllerState`) over the given pids, and `/ft/rejoin`
    with the real body model, which starts a fresh `sleep` as the worker's new process. Records every request."""

    def __init__(self, procs: list[subprocess.Popen]):
        membership = Membership.initial(len(procs))
        for worker, proc in enumerate(procs):
            membership.workers[worker].pid = proc.pid
        self.state = ControllerState(membership, FailureDetector(membership, 0.2, 2.0))
        self.procs = list(procs)
        self.requests: list[tuple[str, str, dict | None, str | None]] = []
        self.url = ""
        self.app = FastAPI()

        @self.app.middleware("http")
        async def record_and_check_key(request: Request, call_next):
            body = await request.body()
            auth = request.headers.get("authorization")
            self.requests.append((request.method, request.url.path, json.loads(body) if body else None, auth))
            if auth != f"Bearer {KEY}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        @self.app.get("/ft/status")
        async def status():
            return self.state.status(time.monotonic())

        @self.app.post("/ft/rejoin")
        async def rejoin(body: WorkerRequest):
            proc = _sleeper()
            self.procs.append(proc)
            self.state.membership.workers[body.worker].pid = proc.pid
            return {"rejoining": body.worker}

    def posts(self) -> list[tuple[str, dict, str]]:
        return [(path, body, auth) for method, path, body, auth in self.requests if method == "POST"]


@pytest.fixture
def procs():
    started = [_sleeper() for _ in range(4)]
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def fake(procs):
    server = FakeFtServer(procs)
    with serving(server.app) as server.url:
        yield server
    for proc in server.procs[len(procs):]:
        proc.kill()
        proc.wait()


def test_signals_land_in_order_on_the_current_pids(fake, procs):
    procs[3].kill()
    procs[3].wait()  # reaped: its pid names no process any more
    procs[2].kill()  # not reaped: a zombie
    trace = _trace((0.0, 1, "hang"), (1.0, 0, "kill"), (2.0, 1, "resume"), (3.0, 0, "rejoin"), (4.0, 0, "kill"),
                   (5.0, 3, "kill"), (5.0, 2, "kill"))
    seen = {}  # what each event did to its process, sampled as the replay reports it

    def on_event(record):
        if record["event"] == "hang":
            seen["hang"] = _state(record["pid"], want=psutil.STATUS_STOPPED)
        elif record["event"] == "resume":
            seen["resume"] = _state(record["pid"], want=psutil.STATUS_SLEEPING)
        elif record["event"] == "kill" and record["worker"] == 0 and "first kill" not in seen:
            seen["first kill"] = procs[0].wait(timeout=5)

    start = time.monotonic()
    records = rp.replay(trace, fake.url, api_key=KEY, speed=20.0, on_event=on_event)
    assert [(r["t_s"], r["worker"], r["event"]) for r in records] == [
        (e.t_s, e.worker, e.event) for e in trace.events]
    assert seen == {"hang": psutil.STATUS_STOPPED, "resume": psutil.STATUS_SLEEPING, "first kill": -9}
    rejoined = fake.procs[4]
    assert rejoined.wait(timeout=5) == -9  # the kill after the rejoin went to the new process
    assert [r["pid"] for r in records] == [procs[1].pid, procs[0].pid, procs[1].pid, None, rejoined.pid,
                                           procs[3].pid, procs[2].pid]
    assert [r["outcome"] for r in records] == ["sent"] * 5 + [
        f"skipped: process {procs[3].pid} is gone", f"skipped: process {procs[2].pid} has already exited"]
    assert fake.posts() == [("/ft/rejoin", {"worker": 0}, f"Bearer {KEY}")]
    # each event waits for its time (trace seconds / speed), in order, and not much longer
    for r in records:
        assert r["scheduled_s"] == pytest.approx(r["t_s"] / 20.0)
        assert r["scheduled_s"] - 0.005 <= r["actual_s"] < r["scheduled_s"] + 1.0
        assert r["at"] - start == pytest.approx(r["actual_s"], abs=0.05)
    assert [r["actual_s"] for r in records] == sorted(r["actual_s"] for r in records)


def test_pid_of_mode_needs_no_ft_status_and_skips_rejoin(procs):
    """For a server without /ft/*; an injected clock and sleep, so nothing really waits."""
    now, sleeps = [100.0], []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    pids = {0: procs[0].pid, 1: procs[1].pid}
    trace = _trace((10.0, 1, "kill"), (30.0, 1, "rejoin"), (40.0, 2, "kill"), (50.0, 0, "hang"))
    records = rp.replay(trace, pid_of=pids.get, speed=2.0, clock=lambda: now[0], sleep=sleep)
    assert sleeps == [5.0, 10.0, 5.0, 5.0]
    assert [(r["scheduled_s"], r["actual_s"], r["at"]) for r in records] == [
        (5.0, 5.0, 105.0), (15.0, 15.0, 115.0), (20.0, 20.0, 120.0), (25.0, 25.0, 125.0)]
    assert [r["outcome"] for r in records] == ["sent", "skipped: this system has no rejoin",
                                               "skipped: worker 2 has no process", "sent"]
    assert procs[1].wait(timeout=5) == -9
    assert _state(procs[0].pid, want=psutil.STATUS_STOPPED) == psutil.STATUS_STOPPED


def test_scheduler_pid_of_finds_the_process_title():
    """Plain SGLang: a worker's launch id is its TP rank, read from `scheduler_TP{rank}` under the server."""
    marked = _sleeper(sys.executable, "-c", "import time; time.sleep(60)", "sglang::scheduler_TP1")
    try:
        pid_of = rp.scheduler_pid_of(lambda: psutil.Process().pid)
        assert pid_of(1) == marked.pid and pid_of(5) is None
        assert rp.scheduler_pid_of(2 ** 22 + 7)(1) is None  # the server itself is gone
    finally:
        marked.kill()
        marked.wait()


def test_dry_run_sends_nothing_and_does_not_wait(fake, procs):
    trace = _trace((50.0, 0, "kill"), (60.0, 0, "rejoin"), (90.0, 1, "hang"))
    start = time.monotonic()
    records = rp.replay(trace, fake.url, api_key=KEY, dry_run=True)
    assert time.monotonic() - start < 5
    assert [r["outcome"] for r in records] == [
        f"dry-run: would send SIGKILL to {procs[0].pid}", "dry-run: would rejoin",
        f"dry-run: would send SIGSTOP to {procs[1].pid}"]
    assert fake.posts() == [] and all(_state(p.pid) == psutil.STATUS_SLEEPING for p in procs[:2])


def test_stop_ends_early_and_records_the_rest(procs):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    records = rp.replay(_trace((0.0, 0, "hang"), (90.0, 0, "resume")), pid_of={0: procs[0].pid}.get, stop=stop)
    assert time.monotonic() - start < 5
    assert [r["outcome"] for r in records] == ["sent", "skipped: the replay was stopped"]


def test_server_refusals_and_an_unreachable_server_are_recorded(fake, procs):
    records = rp.replay(_trace((0.0, 0, "kill"), (0.0, 0, "rejoin")), fake.url, api_key="wrong")
    assert [r["outcome"][:30] for r in records] == ["error: GET /ft/status: HTTP 40", "error: POST /ft/rejoin: HTTP 4"]
    assert "HTTP 401: Unauthorized" in records[0]["outcome"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    records = rp.replay(_trace((0.0, 1, "kill")), url)
    assert records[0]["outcome"].startswith(f"error: the server is not reachable at {url}")
    assert _state(procs[0].pid) == _state(procs[1].pid) == psutil.STATUS_SLEEPING


def test_cli_prints_each_event_and_writes_the_records(fake, procs, tmp_path, capsys):
    path, out = tmp_path / "trace.jsonl", tmp_path / "records.json"
    path.write_text(dumps_trace(_trace((0.0, 2, "kill"), (1.0, 2, "rejoin"))))
    code = rp.main([str(path), "--url", fake.url, "--api-key", KEY, "--speed", "50", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and procs[2].wait(timeout=5) == -9
    assert len(printed) == 3 and "kill   worker 2 pid" in printed[0] and printed[0].endswith(": sent")
    assert printed[-1] == "[replay] 2 sent, 0 skipped, 0 error"
    assert [r["outcome"] for r in json.loads(out.read_text())] == ["sent", "sent"]
    assert rp.main([str(path), "--url", fake.url, "--api-key", "wrong"]) == 1


def test_bad_trace_exits_2_naming_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = dumps_trace(_trace((1.0, 0, "kill"))).splitlines() + ['{"t_s": 2.0, "rank": 1, "event": "kill"}']
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, str(PATH), str(path), "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{path}: line 3, field 'worker': missing" in proc.stderr
