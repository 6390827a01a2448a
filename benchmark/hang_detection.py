"""Hang detection under load: how fast a SIGSTOPped worker is declared dead, and that short stalls are not.

    python benchmark/hang_detection.py [--tp 2] [--hangs 6] [--stalls 5] [--stall-ms 250] [--clients 4] [--out DIR]

One `--ft --ft-respawn` server (sglang-ft's default heartbeat settings unless given) under a closed-loop greedy load
checked against transformers:

1. `--warmup-s` of load alone: each worker's longest iteration and heartbeat gap under load (`max_step_ms`,
   `max_beat_gap_ms` in /ft/status), the margin the detector's blocked bound must leave.
2. `--stalls` SIGSTOPs of `--stall-ms` each, mid-decode, ranks in turn: none may be declared dead (epoch unchanged).
3. `--hangs` SIGSTOPs, mid-decode, ranks in turn, each held until `/ft/status` shows the worker dead, then SIGCONT
   (it is fenced and exits); the server restarts it and plans it back in before the next.

Per hang: `detect_ms`, the controller's (the worker's silence when declared: since its last beat, so at least the
time since the stop), `polled_ms` (the stop until a 20 ms poll of /ft/status saw it dead: an upper bound too) and
the cause. Writes hang_detection.json to `--out` (default benchmark/results); exits 1 if a stall was declared dead,
a hang was not declared before the timeout, or an output differed from transformers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import requests

from ft.failure_detector import blocked_bound
from ft.process_watch import ProcessWatch
from sglang_ft.server_args import FtArgs
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.hf_reference import greedy_references
from sglang_ft.tools.load import Load
from sglang_ft.tools.server_process import ServerProcess

if __package__ in (None, ""):  # run as `python benchmark/x.py`: import `benchmark.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the soak's prompts: greedy outputs of clear winners on the tiny model
from benchmark.chaos import PROMPTS  # noqa: E402

gone = ProcessWatch().gone


def status(url: str) -> dict:
    return requests.get(f"{url}/ft/status", timeout=10).json()


def wait_until(predicate, timeout_s: float, poll_s: float = 0.2, what: str = "the server"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def member(url: str, rank: int) -> dict:
    """The worker at `rank` once it is decoding (mid-decode: the load keeps it busy)."""
    def decoding():
        st = status(url)
        found = [w for w in st["workers"] if w["rank"] == rank and w["state"] == "healthy"]
        return found and found[0].get("running_requests") and {**found[0], "epoch": st["epoch"]}

    return wait_until(decoding, 60, 0.05, f"rank {rank} to decode")


def stall(url: str, rank: int, stall_s: float, settle_s: float) -> dict:
    """SIGSTOP the worker at `rank` for `stall_s`, then wait `settle_s`: it must still be a member, epoch unchanged."""
    victim = member(url, rank)
    os.kill(victim["pid"], signal.SIGSTOP)
    time.sleep(stall_s)
    os.kill(victim["pid"], signal.SIGCONT)
    time.sleep(settle_s)
    st = status(url)
    kept = any(w["pid"] == victim["pid"] and w["rank"] is not None for w in st["workers"])
    suspected = any(d["pid"] == victim["pid"] and d["state"] == "suspect" for d in st["detections"])
    return {"rank": rank, "worker": victim["worker"], "pid": victim["pid"], "kept": kept,
            "epoch_unchanged": st["epoch"] == victim["epoch"], "suspected": suspected}


def hang(url: str, rank: int, tp: int, settle_s: float) -> dict:
    """SIGSTOP the worker at `rank` until it is declared dead; SIGCONT; wait until it is replaced and back at `tp`."""
    victim = member(url, rank)
    pid, worker = victim["pid"], victim["worker"]
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: any(w["pid"] == pid and w["state"] == "dead" for w in status(url)["workers"]), settle_s,
                   0.02, f"worker {worker} declared dead")
        polled_ms = (time.monotonic() - stopped) * 1e3
    finally:
        os.kill(pid, signal.SIGCONT)
    st = wait_until(lambda: (s := status(url))["epoch"] > victim["epoch"] and s["regrouping"] is None and s,
                    settle_s, what="the regroup without it")
    recovery = next(r for r in st["recoveries"] if r["epoch"] == victim["epoch"] + 1)
    wait_until(lambda: gone(pid), settle_s, what=f"pid {pid} fenced")
    wait_until(lambda: (s := status(url))["tp_size"] == tp and s["regrouping"] is None
               and all(w["state"] == "healthy" for w in s["workers"]), 300, 0.5, f"worker {worker} back")
    return {"rank": rank, "worker": worker, "pid": pid, "polled_ms": round(polled_ms, 1),
            "detect_ms": recovery["detect_ms"], "cause": recovery["cause"]}


def per_worker(st: dict, key: str) -> dict:
    return {str(w["worker"]): w[key] for w in st["workers"] if w["rank"] is not None}


def summarize(hangs: list[dict]) -> dict:
    """Median and max of each detection time, and how many hangs a blocked peer confirmed."""
    out = {"confirmed_by_a_blocked_peer": sum("blocked peer" in h["cause"] for h in hangs), "hangs": len(hangs)}
    for key in ("detect_ms", "polled_ms"):
        values = [h[key] for h in hangs]
        out[key] = {"median": round(statistics.median(values), 1), "max": max(values), "min": min(values)}
    return out


def failures(report: dict, timeout_ms: int) -> list[str]:
    found = [f"stall of worker {s['worker']} (pid {s['pid']}) changed the group" for s in report["stalls"]
             if not (s["kept"] and s["epoch_unchanged"])]
    found += [f"hang of worker {h['worker']} declared after {h['detect_ms']} ms (timeout {timeout_ms} ms)"
              for h in report["hangs"] if h["detect_ms"] >= timeout_ms]
    load = report["load"]
    found += [f"{load[k]} {what}" for k, what in (("mismatched", "outputs differ from transformers"),
                                                 ("lost", "requests lost")) if load[k]]
    return found


def measure(server: ServerProcess, args, expected: dict) -> dict:
    url = server.url
    load = Load(url, PROMPTS, args.max_new_tokens, expected=expected, stagger_tokens=5).start(args.clients)
    try:
        time.sleep(args.warmup_s)
        normal = status(url)
        settle_s = 1.5 * args.heartbeat_timeout_ms / 1e3
        stalls = [stall(url, i % args.tp, args.stall_ms / 1e3, settle_s) for i in range(args.stalls)]
        after_stalls = status(url)
        hangs = [hang(url, (1 + i) % args.tp, args.tp, 60.0) for i in range(args.hangs)]
    finally:
        load.finish()
    return {
        "normal_load": {"max_step_ms": per_worker(normal, "max_step_ms"),
                        "max_beat_gap_ms": per_worker(normal, "max_beat_gap_ms"), "after_s": args.warmup_s},
        "stalls": stalls,
        "max_step_ms_after_stalls": per_worker(after_stalls, "max_step_ms"),
        "hangs": hangs,
        "summary": summarize(hangs) if hangs else {},
        "load": {"served": load.completed, "mismatched": load.mismatched, "resent": load.failed_attempts,
                 "lost": load.unfinished},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hangs", type=int, default=6)
    parser.add_argument("--stalls", type=int, default=5)
    parser.add_argument("--stall-ms", type=int, default=250)
    parser.add_argument("--clients", type=int, default=4, help="closed-loop streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=20.0, help="load alone before the first stall")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=FtArgs.heartbeat_interval_ms)
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=FtArgs.heartbeat_timeout_ms)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.tp < 2:
        parser.error("--tp must be at least 2 (a hang is confirmed by a peer)")
    if min(args.hangs, args.stalls, args.stall_ms, args.warmup_s) < 0 or args.clients < 1:
        parser.error("--hangs, --stalls, --stall-ms and --warmup-s must be >= 0, --clients positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_tiny_model.ensure_model(args.model_dir)
    expected = greedy_references(str(args.model_dir), PROMPTS, args.max_new_tokens)
    flags = ["--ft-enable-fault-injection", "--ft-respawn", "--ft-respawn-delay-s", "1",
             "--ft-heartbeat-interval-ms", str(args.heartbeat_interval_ms),
             "--ft-heartbeat-timeout-ms", str(args.heartbeat_timeout_ms)]
    server = ServerProcess(str(args.model_dir), tp_size=args.tp, ft=True, extra_args=flags).start()
    print(f"[hang] TP {args.tp} --ft server healthy in {server.startup_s:.1f} s", flush=True)
    try:
        report = measure(server, args, expected)
    finally:
        server.stop()
    report["failures"] = failures(report, args.heartbeat_timeout_ms)
    report["blocked_after_ms"] = round(blocked_bound(args.heartbeat_timeout_ms / 1e3) * 1e3, 1)  # this code's bound
    report.update(date=dt.date.today().isoformat(),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hang_detection.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("summary", "normal_load", "max_step_ms_after_stalls", "failures")},
                     indent=1), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
