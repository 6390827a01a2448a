"""Replay a fault trace (`ft/fault_trace.py`) against a running server from outside, as a real failure arrives.

    python benchmark/replay.py TRACE.jsonl [--url http://127.0.0.1:30000] [--api-key K] [--admin-api-key K]
        [--speed 1.0] [--dry-run] [--out RECORDS.json]

A GPU that dies or wedges does not ask the server first, so faults are signals sent with `os.kill` from this
process (kill: SIGKILL, hang: SIGSTOP, resume: SIGCONT), not `/ft/inject_fault`. Trace events name a worker by
launch id; its pid is read just before each signal, since a rejoin gives the slot a new process. With `--url`
the pid comes from `GET /ft/status`; other benchmarks may call `replay(..., pid_of=...)` instead, for a server
with no `/ft/*` API (plain SGLang: `scheduler_pid_of(server_pid)`, where a launch id is the launch TP rank).
A `rejoin` is `POST /ft/rejoin {"worker": W}` (the server needs `--ft-enable-fault-injection`, and its admin
key: `--admin-api-key` where it has one, else `--api-key`), or the `rejoin` callable; a system with neither has no
rejoin and the event is skipped.

Every event is recorded, never raised: {t_s, scheduled_s, actual_s, at, worker, event, pid, outcome}, with
`scheduled_s` and `actual_s` in wall seconds from the start (trace time / --speed), `at` the raw clock reading
(time.monotonic by default, to line up with a load's token times) and `outcome` "sent", "skipped: why" or
"error: what". A process already gone is a skip: a trace drawn without knowing the server's own recoveries
(SGLang's restart, `--ft-respawn`) may name one. Exit codes: 0 replayed, 1 some event ended in an error,
2 the trace is invalid (the message names its line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
from ft.fault_trace import FaultTrace, TraceError, load_trace
from ft.faults import FAULT_SIGNALS, PROCESS_FAULTS
from sglang_ft.ctl import CtlError, FtClient
from sglang_ft.tools.load import scheduler_pid

SIGNALS = {kind: FAULT_SIGNALS[kind] for kind in PROCESS_FAULTS}
PidOf = Callable[[int], "int | None"]


class Skip(Exception):
    """The event cannot apply (no such process, no rejoin on this system); recorded as skipped, not an error."""


class FtServer:
    """A `--ft` server's `/ft/*` API as `pid_of` and `rejoin`: the pid `/ft/status` lists for a worker id."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 5.0,
                 admin_api_key: str | None = None):
        self.client = FtClient(url, api_key, timeout_s, admin_api_key)

    def pid_of(self, worker: int) -> int | None:
        entry = next((w for w in self.client.status().get("workers", []) if w.get("worker") == worker), None)
        if entry is None:
            raise Skip(f"worker {worker} is not listed in /ft/status")
        return entry.get("pid")

    def rejoin(self, worker: int) -> None:
        self.client.post("/ft/rejoin", {"worker": worker})


def scheduler_pid_of(server_pid: int | Callable[[], int]) -> PidOf:
    """`pid_of` for plain SGLang: the `scheduler_TP{worker}` process under the server (a callable follows a
    server that a supervisor relaunches); None when there is none (the server died or runs narrower)."""

    def pid_of(worker: int) -> int | None:
        try:
            return scheduler_pid(server_pid() if callable(server_pid) else server_pid, worker)
        except (RuntimeError, psutil.Error):
            return None

    return pid_of


def _signal(worker: int, pid: int | None, event: str, dry_run: bool) -> str:
    if pid is None:
        raise Skip(f"worker {worker} has no process")
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise Skip(f"process {pid} has already exited")
    except psutil.NoSuchProcess:
        raise Skip(f"process {pid} is gone") from None
    if dry_run:
        return f"dry-run: would send {SIGNALS[event].name} to {pid}"
    try:
        os.kill(pid, SIGNALS[event])
    except ProcessLookupError:  # exited between the check and the signal
        raise Skip(f"process {pid} is gone") from None
    return "sent"


def replay(trace: FaultTrace | str | Path, url: str | None = None, *, api_key: str | None = None,
           admin_api_key: str | None = None, speed: float = 1.0, dry_run: bool = False, pid_of: PidOf | None = None,
           rejoin: Callable[[int], None] | None = None, on_event: Callable[[dict], None] | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
           stop: threading.Event | None = None, timeout_s: float = 5.0) -> list[dict]:
    """Apply each event at `t_s / speed` seconds from the call and return one record per event (see the module
    docstring). With `url` and no `pid_of`, pids and rejoins go through `/ft/*`; with `pid_of`, a rejoin needs the
    `rejoin` callable. `dry_run` waits for nothing and sends nothing (pids are still looked up, read-only).
    Setting `stop` ends the replay early: the events not yet due are recorded as skipped."""
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    if not isinstance(trace, FaultTrace):
        trace = load_trace(trace)
    if pid_of is None:
        if url is None:
            raise ValueError("give a url (a --ft server's /ft/status) or pid_of")
        server = FtServer(url, api_key, timeout_s, admin_api_key)
        pid_of, rejoin = server.pid_of, rejoin or server.rejoin
    records, start = [], clock()
    for e in trace.events:
        scheduled = e.t_s / speed
        while not dry_run and (left := start + scheduled - clock()) > 0 and not (stop and stop.is_set()):
            sleep(min(left, 0.1) if stop else left)
        pid = None
        try:
            if stop is not None and stop.is_set():
                raise Skip("the replay was stopped")
            if e.event == "rejoin":
                if rejoin is None:
                    raise Skip("this system has no rejoin")
                if not dry_run:
                    rejoin(e.worker)
                outcome = "dry-run: would rejoin" if dry_run else "sent"
            else:
                pid = pid_of(e.worker)
                outcome = _signal(e.worker, pid, e.event, dry_run)
        except Skip as exc:
            outcome = f"skipped: {exc}"
        except (CtlError, OSError, psutil.Error, RuntimeError, ValueError) as exc:
            outcome = f"error: {exc}"
        at = clock()
        record = {"t_s": e.t_s, "scheduled_s": round(scheduled, 4), "actual_s": round(at - start, 4), "at": at,
                  "worker": e.worker, "event": e.event, "pid": pid, "outcome": outcome}
        records.append(record)
        if on_event is not None:
            on_event(record)
    return records


def format_record(r: dict) -> str:
    pid = "-" if r["pid"] is None else r["pid"]
    return (f"[replay] t={r['t_s']:8.3f}s  at {r['actual_s']:8.3f}s (due {r['scheduled_s']:8.3f})  "
            f"{r['event']:<6} worker {r['worker']} pid {pid}: {r['outcome']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="a fault trace (JSON Lines, ft/fault_trace.py)")
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="a --ft server (its /ft/status, /ft/rejoin)")
    parser.add_argument("--api-key", default=os.environ.get("SGLANG_API_KEY"),
                        help="the server's --api-key (default $SGLANG_API_KEY)")
    parser.add_argument("--admin-api-key", default=os.environ.get("SGLANG_ADMIN_API_KEY"),
                        help="the server's --admin-api-key, for rejoins where it has one (default "
                             "$SGLANG_ADMIN_API_KEY, else --api-key)")
    parser.add_argument("--speed", type=float, default=1.0, help="trace seconds per wall second")
    parser.add_argument("--dry-run", action="store_true", help="look up pids, send nothing, wait for nothing")
    parser.add_argument("--out", help="write the records here as JSON")
    args = parser.parse_args(argv)
    if not args.speed > 0:
        parser.error("--speed must be positive")
    try:
        trace = load_trace(args.trace)
    except (TraceError, OSError) as exc:
        print(f"error: invalid trace: {exc}", file=sys.stderr)
        return 2
    records = replay(trace, args.url, api_key=args.api_key, admin_api_key=args.admin_api_key, speed=args.speed,
                     dry_run=args.dry_run, on_event=lambda r: print(format_record(r), flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    counts = {k: sum(r["outcome"].startswith(k) for r in records) for k in ("sent", "skipped", "error", "dry-run")}
    print("[replay] " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k != "dry-run"))
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
