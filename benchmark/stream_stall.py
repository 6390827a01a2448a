"""Stream stall: how long every in-flight stream waits for its next token after a TP worker is SIGKILLed or hangs.

    python -m benchmark.stream_stall [--tp 4] [--clients 6] [--kills 5] [--stops 5] [--max-wall-s 1800] [--out DIR]

One `--ft --ft-enable-fault-injection --ft-respawn` server at TP `--tp` (the tiny model, KV backup on: the default)
under `--clients` closed-loop streaming greedy clients, each recording the arrival time of every chunk of every
request. Faults in turn on the non-zero ranks, each while the victim decodes:

1. `--kills` SIGKILLs (the controller sees the process exit);
2. `--stops` SIGSTOPs, held until `/ft/status` shows the worker dead (the hang rule: silent and a blocked peer), then
   SIGCONT (it is fenced and exits).

After each: the regroup to TP N-1, then the respawned worker back in (TP N again) and `--settle-s` for the standby
groups of the next single failure, so every fault is TP N -> N-1 from the same state.

Per fault, for every stream in flight at the fault (a chunk before it and one after, in one request), its stall: the
longest silence from the `os.kill` on that began before the regroup was done (the time to its next chunk, unless a
chunk already on its way arrived just after the fault; `next_chunk_ms` keeps that literal gap too); the fault's stall
is the largest. Reported per phase: median and max over faults of that stall, and of all the streams' stalls; and
per fault where the time went: `declared_ms` (the kill until the
controller's `worker_dead` event), the recovery's `stage_ms` (the slowest member per stage) with the group rebuild's
parts from the server log (teardown, store, groups), and the rest (`after_stages_ms`: the first step after the
regroup and the delivery). Every output is checked against transformers and every request must complete. Writes
stream_stall.json to `--out` (default benchmark/results); exits 1 on a lost request, a wrong output or a fault that
did not recover.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from sglang_ft.ctl_events import read_events
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.hf_reference import greedy_references
from sglang_ft.tools.load import ClientThreads, stream_generate
from sglang_ft.tools.server_process import ServerProcess

if __package__ in (None, ""):  # run as `python benchmark/x.py`: import `benchmark.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.chaos import PROMPTS  # noqa: E402  (greedy outputs of clear winners on the tiny model)
from benchmark.hang_detection import gone, member, status, wait_until  # noqa: E402

TARGET_MS = {"kill": 250.0, "stop": 800.0}  # issue 26: median over faults of the slowest stream's stall
LATE_STAGES = ("recapture_graphs",)  # reported with a recovery, but run between steps after serving resumed
REBUILD_LINE = re.compile(r"recovery to epoch (\d+): rebuild_process_groups done in ([\d.]+) ms "
                          r"\(rank \d+ of \d+(, from standby groups)?: ([^)]*)\)")


# --- the pure parts: gaps and summaries from chunk arrival times ---

def next_chunk_gaps(streams: list[list[float]], fault_at: float) -> list[float]:
    """For each stream (one request's chunk arrival times) in flight at `fault_at`, a chunk before it and one at or
    after it, the time from the fault to that next chunk. Streams that ended before or began after are left out."""
    gaps = []
    for times in streams:
        after = [t for t in times if t >= fault_at]
        if after and any(t < fault_at for t in times):
            gaps.append(min(after) - fault_at)
    return gaps


def stalls(streams: list[list[float]], fault_at: float, recovered_at: float) -> list[float]:
    """For each stream in flight at `fault_at`, the longest silence the fault caused it: over its chunks after the
    fault whose silence began before `recovered_at` (the regroup done), the wait from the previous chunk or the
    fault, whichever is later. Equal to the next chunk's gap unless a chunk already on its way arrived just after
    the fault (a step the victim had finished its part of) and the stall came after it."""
    out = []
    for times in streams:
        before = [t for t in times if t < fault_at]
        if not before or not any(t >= fault_at for t in times):
            continue
        previous, longest = fault_at, 0.0
        for t in sorted(t for t in times if t >= fault_at):
            if previous >= recovered_at:
                break
            longest, previous = max(longest, t - previous), t
        out.append(longest)
    return out


def spread(values: list[float]) -> dict:
    """Median, max and count of some milliseconds (None where there are none)."""
    if not values:
        return {"median": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1), "n": len(values)}


def summarize(faults: list[dict]) -> dict:
    """Per kind of fault: the spread over faults of each fault's stall (its slowest stream), of every stream's
    stall, and of each fault's slowest next chunk; the median stall against the target."""
    out = {}
    for kind in ("kill", "stop"):
        mine = [f for f in faults if f["kind"] == kind and f["stalls_ms"]]
        worst = [max(f["stalls_ms"]) for f in mine]
        out[kind] = {"faults": len(mine), "stall_ms": spread(worst),
                     "stream_stall_ms": spread([g for f in mine for g in f["stalls_ms"]]),
                     "next_chunk_ms": spread([max(f["next_chunk_ms"]) for f in mine]),
                     "declared_ms": spread([f["declared_ms"] for f in mine if f["declared_ms"] is not None]),
                     "target_ms": TARGET_MS[kind],
                     "met": bool(worst) and statistics.median(worst) <= TARGET_MS[kind]}
    return out


def breakdown(stall_ms: float, declared_ms: float | None, stage_ms: dict) -> dict:
    """Where one fault's stall went: detection, the regroup's stages (the slowest member each, so their sum is an
    upper bound of the regroup), and the rest (the first step after it and the delivery to the client)."""
    stages = round(sum(ms for stage, ms in stage_ms.items() if stage not in LATE_STAGES), 1)
    rest = None if declared_ms is None else round(stall_ms - declared_ms - stages, 1)
    return {"declared_ms": declared_ms, "stages_ms": stages, "after_stages_ms": rest}


def rebuild_parts(log_text: str) -> dict[int, dict]:
    """Per epoch, the slowest member's group rebuild from the server log: its time, its parts, and whether the
    standby groups served it."""
    out: dict[int, dict] = {}
    for epoch, ms, standby, parts in REBUILD_LINE.findall(log_text):
        if int(epoch) not in out or float(ms) > out[int(epoch)]["ms"]:
            out[int(epoch)] = {"ms": float(ms), "standby": bool(standby),
                               "parts_ms": {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) ms", parts)}}
    return out


# --- the load: closed-loop streaming clients that keep every chunk's arrival time ---

@dataclass
class StreamRecord:
    client: int
    prompt: str
    max_new_tokens: int
    chunks: list[float] = field(default_factory=list)  # time.monotonic() of each chunk bringing tokens
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    failed_attempts: int = 0


class StreamClients(ClientThreads):
    """`clients` closed-loop greedy streams; client i asks for `max_new_tokens - i * stagger` tokens, so they drift
    apart. A failed attempt is re-sent and counted; its chunks stay in the record (the stream's view)."""

    def __init__(self, url: str, prompts: list[str], max_new_tokens: int, stagger: int):
        self.url, self.prompts, self.max_new_tokens, self.stagger = url, prompts, max_new_tokens, stagger
        self.records: list[StreamRecord] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def client(self, index: int) -> None:
        n, tokens = index, max(1, self.max_new_tokens - index * self.stagger)
        while not self.stop.is_set():
            record = StreamRecord(index, self.prompts[n % len(self.prompts)], tokens)
            with self.lock:
                self.records.append(record)
            self._one(record)
            n += 1

    def _one(self, record: StreamRecord) -> None:
        body = {"text": record.prompt, "stream": True,
                "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": record.max_new_tokens}}
        while True:  # until it completes: once the load stops, one more try, then it counts as lost
            try:
                record.output_ids = stream_generate(self.url, body, lambda n, now: record.chunks.append(now))
                if len(record.output_ids) < record.max_new_tokens:
                    raise RuntimeError("stream ended early")
                record.done = True
                return
            except (requests.RequestException, RuntimeError, ValueError):
                record.failed_attempts += 1
                if self.stop.is_set() and record.failed_attempts > 1:
                    return
                time.sleep(0.2)

    def streams(self) -> list[list[float]]:
        with self.lock:
            return [list(r.chunks) for r in self.records]

    def check(self, expected: dict[str, list[int]]) -> dict:
        with self.lock:
            records = list(self.records)
        return {"requests": len(records), "completed": sum(r.done for r in records),
                "lost": sum(not r.done for r in records),
                "mismatched": sum(r.done and r.output_ids != expected[r.prompt][:r.max_new_tokens] for r in records),
                "failed_attempts": sum(r.failed_attempts for r in records)}


class EventFollower:
    """`GET /ft/events` read in a thread: the controller's timestamped events (time.time())."""

    def __init__(self, url: str):
        self.response = requests.get(f"{url}/ft/events", stream=True, timeout=(10, 600))
        self.response.raise_for_status()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            self.events.extend(read_events(self.response))
        except (requests.RequestException, AttributeError, ValueError):  # closed at the end
            pass

    def first(self, type_: str, **match) -> dict | None:
        return next((e for e in list(self.events) if e.get("type") == type_
                     and all(e.get(k) == v for k, v in match.items())), None)

    def close(self) -> None:
        self.response.close()


# --- the faults ---

def inject(url: str, kind: str, rank: int, tp: int, events: EventFollower, settle_s: float) -> dict:
    """SIGKILL or SIGSTOP the worker at `rank` mid-decode; wait for the regroup without it and for its replacement
    to be planned back in (TP `tp` again), then `settle_s`. Returns the fault's time and the recovery's record."""
    victim = member(url, rank)
    pid, worker, epoch = victim["pid"], victim["worker"], victim["epoch"]
    fault_wall, fault_at = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    if kind == "stop":
        try:
            wait_until(lambda: any(w["pid"] == pid and w["state"] == "dead" for w in status(url)["workers"]), 60,
                       0.02, f"worker {worker} declared dead")
        finally:
            os.kill(pid, signal.SIGCONT)  # fenced: it finds itself outside the new epoch and exits
    st = wait_until(lambda: (s := status(url))["epoch"] > epoch and s["regrouping"] is None and s, 60, 0.1,
                    "the regroup without it")
    recovery = next(r for r in st["recoveries"] if r["epoch"] == epoch + 1)
    wait_until(lambda: gone(pid), 60, what=f"pid {pid} gone")
    wait_until(lambda: (s := status(url))["tp_size"] == tp and s["regrouping"] is None
               and all(w["state"] == "healthy" for w in s["workers"]), 300, 0.5, f"worker {worker}'s replacement")
    time.sleep(settle_s)
    dead = events.first("worker_dead", worker=worker, epoch=epoch)
    done = events.first("regroup_done", epoch=epoch + 1)
    recovered_s = done["time"] - fault_wall if done else (recovery["detect_ms"] + recovery["recover_ms"]) / 1e3
    return {"kind": kind, "rank": rank, "worker": worker, "pid": pid, "epoch": epoch + 1, "fault_at": fault_at,
            "recovered_ms": round(recovered_s * 1e3, 1),
            "declared_ms": round((dead["time"] - fault_wall) * 1e3, 1) if dead else None,
            "cause": recovery["cause"], "detect_ms": recovery["detect_ms"], "recover_ms": recovery["recover_ms"],
            "stage_ms": recovery["stage_ms"], "kv_tokens_recomputed": recovery["kv_tokens_recomputed"]}


def run_faults(url: str, args, events: EventFollower, started: float) -> tuple[list[dict], list[str]]:
    plan = ["kill"] * args.kills + ["stop"] * args.stops
    faults, skipped = [], []
    for i, kind in enumerate(plan):
        if time.monotonic() - started > args.max_wall_s:
            skipped = plan[i:]
            print(f"[stall] wall-clock cap of {args.max_wall_s:.0f} s reached: {len(skipped)} faults left out",
                  flush=True)
            break
        fault = inject(url, kind, 1 + i % (args.tp - 1), args.tp, events, args.settle_s)
        print(f"[stall] {kind} of rank {fault['rank']}: declared {fault['declared_ms']} ms, "
              f"recover {fault['recover_ms']} ms ({fault['cause']})", flush=True)
        faults.append(fault)
    return faults, skipped


def measure(server: ServerProcess, args, expected: dict) -> dict:
    events = EventFollower(server.url)
    clients = StreamClients(server.url, PROMPTS, args.max_new_tokens, args.stagger).start(args.clients)
    started = time.monotonic()
    try:
        time.sleep(args.warmup_s)
        first_fault = time.monotonic()
        faults, skipped = run_faults(server.url, args, events, started)
    finally:
        clients.finish()
        events.close()
    streams, rebuilds = clients.streams(), rebuild_parts(server.log_text())
    for fault in faults:
        at, recovered_at = fault["fault_at"], fault["fault_at"] + fault["recovered_ms"] / 1e3
        fault["stalls_ms"] = [round(g * 1e3, 1) for g in stalls(streams, at, recovered_at)]
        fault["next_chunk_ms"] = [round(g * 1e3, 1) for g in next_chunk_gaps(streams, at)]
        fault["stall_ms"] = max(fault["stalls_ms"], default=None)
        fault["chunks_ms"] = [[round((t - at) * 1e3, 1) for t in s if -1 <= t - at <= fault["recovered_ms"] / 1e3 + 2]
                              for s in streams if any(t < at for t in s) and any(t >= at for t in s)]
        if fault["stall_ms"] is not None:
            fault["breakdown"] = breakdown(fault["stall_ms"], fault["declared_ms"], fault["stage_ms"])
        fault["rebuild"] = rebuilds.get(fault["epoch"])
        del fault["fault_at"]
    steady = [b - a for s in streams for a, b in zip(s, s[1:]) if b < first_fault]
    return {"summary": summarize(faults), "faults": faults, "faults_left_out": skipped,
            "steady_chunk_interval_ms": spread([x * 1e3 for x in steady]), "load": clients.check(expected)}


def failures(report: dict) -> list[str]:
    load = report["load"]
    found = [f"{load[k]} {what}" for k, what in (("mismatched", "outputs differ from transformers"),
                                                 ("lost", "requests lost")) if load[k]]
    found += [f"{f['kind']} of rank {f['rank']}: no stream in flight" for f in report["faults"] if not f["stalls_ms"]]
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--clients", type=int, default=6, help="closed-loop streaming clients")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--stagger", type=int, default=4, help="client i asks for this many tokens fewer per i")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load alone before the first fault")
    parser.add_argument("--settle-s", type=float, default=3.0, help="after a rejoin, before the next fault")
    parser.add_argument("--respawn-delay-s", type=float, default=0.5)
    parser.add_argument("--max-wall-s", type=float, default=1800.0, help="no fault started after this")
    parser.add_argument("--start-timeout-s", type=float, default=600.0,
                        help="launch to healthy (TP 4 on 2 shared cores can take minutes)")
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.tp < 2:
        parser.error("--tp must be at least 2 (a non-zero rank is the victim)")
    if min(args.kills, args.stops, args.stagger, args.warmup_s, args.settle_s, args.respawn_delay_s) < 0:
        parser.error("--kills, --stops, --stagger, --warmup-s, --settle-s and --respawn-delay-s must be >= 0")
    if args.clients < 1 or args.max_new_tokens - (args.clients - 1) * args.stagger < 8:
        parser.error("--clients must be positive and every client must ask for at least 8 tokens "
                     "(--max-new-tokens - (--clients - 1) * --stagger)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_tiny_model.ensure_model(args.model_dir)
    expected = greedy_references(str(args.model_dir), PROMPTS, args.max_new_tokens)
    flags = ["--ft-enable-fault-injection", "--ft-respawn", "--ft-respawn-delay-s", str(args.respawn_delay_s)]
    server = ServerProcess(str(args.model_dir), tp_size=args.tp, ft=True, extra_args=flags).start(args.start_timeout_s)
    print(f"[stall] TP {args.tp} --ft server healthy in {server.startup_s:.1f} s", flush=True)
    try:
        report = measure(server, args, expected)
    finally:
        server.stop()
    report["failures"] = failures(report)
    report.update(date=dt.date.today().isoformat(),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  tp=f"{args.tp} -> {args.tp - 1}",
                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_stall.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("summary", "steady_chunk_interval_ms", "load", "failures")}, indent=1),
          flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
