"""Serving under a fault trace: sglang-ft, restart-and-reload and plain SGLang with no recovery, same load, same trace.

    python benchmark/under_faults.py [--full] [--tp 4] [--rate 1.5] [--trace FILE] [--ft-respawn]
        [--rr-widen next-restart|immediate] [--systems ft,rr,none]

One run measures three systems one after the other on the 12-head / 12-KV-head bench model of failover.py (any TP
1..4 serves it, plain SGLang too), each under the same open-loop load (`OpenLoad`: seeded Poisson arrivals of
greedy streaming requests; a failed attempt is re-sent) and the same fault trace (`ft/fault_trace.py`, drawn with
a fixed seed, or `--trace`), replayed from outside by signals (`benchmark/replay.py`) in a thread:

- `ft`: `--ft` at TP N with `--ft-enable-fault-injection`; the trace's rejoins are `POST /ft/rejoin`.
- `rr` (restart-and-reload): plain SGLang at TP N under a supervisor. Its liveness probe fails when the launcher or
  a scheduler process exits or `/health` misses twice (3 s each); it then stops what is left and relaunches at the
  width of the devices still good (TP = N - failed; which devices failed and which came back it learns from the
  trace's events, as a node health monitor would tell it). A device failing during a relaunch cancels it (the
  launch would fail on it) and the next one is narrower. A rejoined device is used at the next restart
  (`--rr-widen next-restart`, the default: the supervisor does not take a healthy server down to widen it) or at
  once (`immediate`). Clients re-send failed requests to whichever server is up.
- `none`: plain SGLang at TP N, no recovery. The same liveness probe only watches: once it fails after a fault the
  run ends, and every request not completed (in flight, or due later and never sent) counts as lost.

Measured per system: throughput over time (tokens of completed requests, 1 s windows, by token arrival), goodput
(requests/s and tokens/s of requests meeting the SLO: TTFT <= --slo-ttft-s from the first send, TPOT <=
--slo-tpot-s), TTFT/TPOT p50/p99 before the first fault, during recovery windows and after, requests lost (due in
the window, not completed by the end of the drain), failed attempts, and the recovery latency per fault: from the
signal until the first success of a request sent after it (a one-token probe is sent at every fault and re-sent
every 0.1 s; load requests count too). A recovery window is [fault, fault + its recovery latency].
Writes benchmark/results/under_faults.json and under_faults.png and prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from ft.fault_trace import FaultTrace, dumps_trace, generate, load_trace, validate
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.load import OpenLoad, arrival_times, scheduler_pid
from sglang_ft.tools.server_process import ServerProcess

if __package__ in (None, ""):  # run as `python benchmark/x.py`: import `benchmark.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.failover import BENCH_MODEL_FLAGS, PROMPTS  # noqa: E402
from benchmark.replay import format_record, replay, scheduler_pid_of  # noqa: E402
from benchmark.under_faults_measures import (FAULTS, SYSTEMS, delivered, mean_recovery, plot, ratios,  # noqa: E402
                                             summarize, table)

# quick: a kill at 10 s and its rejoin 20 s later in 45 s (seed 37 of the generator with these parameters; short
# enough for `make bench`, long enough for restart-and-reload to come back in the drain); full: 3 min, 3 kills (rank
# 0 once), 2 hangs, 5 rejoins (seed 9: at least one worker serves throughout even where a restarted worker needs
# 90 s to start, as on this 2-core machine; seed 1 killed all four within 62 s while the first two still started)
PRESETS = {
    "quick": dict(window_s=45.0, trace_seed=37, acceleration=3e6, hang_fraction=0.0, rate=1.5, max_new_tokens=16,
                  drain_s=60.0),
    "full": dict(window_s=180.0, trace_seed=9, acceleration=3e6, hang_fraction=0.25, rate=1.5, max_new_tokens=24,
                 drain_s=120.0),
}
REPAIR_S = 20.0  # the generator's default: a dead device is back 20 s after it died


def make_trace(tp: int, preset: dict) -> FaultTrace:
    return generate(tp, preset["window_s"], preset["trace_seed"], acceleration=preset["acceleration"],
                    repair_s=REPAIR_S, hang_fraction=preset["hang_fraction"])


def paced(trace: FaultTrace, min_gap_s: float) -> FaultTrace:
    """The trace with its faults at least `min_gap_s` apart, so restart-and-reload can finish a relaunch between
    two (on this CPU a launch takes about a minute; the drawn traces fault every 20-60 s). From each fault that comes
    too soon after the previous one, it and every later event move later by the same amount: each fault's resume
    and rejoin stay as far after it as drawn, the order is kept, and the window grows by the total shift."""
    shift, last_fault, events = 0.0, None, []
    for e in trace.events:
        t = e.t_s + shift
        if e.event in FAULTS:
            if last_fault is not None and t < last_fault + min_gap_s:
                shift += last_fault + min_gap_s - t
                t = last_fault + min_gap_s
            last_fault = t
        events.append(dataclasses.replace(e, t_s=round(t, 3)))
    header = dataclasses.replace(trace.header, window_s=round(trace.header.window_s + shift, 3),
                                 params={**trace.header.params, "min_fault_gap_s": min_gap_s})
    out = FaultTrace(header, tuple(events))
    validate(out)
    return out


# ---------------------------------------------------------------- servers, probes, supervisor

@dataclass
class CancellableServer(ServerProcess):
    """A ServerProcess whose start gives up as soon as `cancel` is set (a device it launches on failed)."""

    cancel: threading.Event | None = None

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise RuntimeError("start cancelled: a device of this launch failed")
            try:
                return super()._wait_healthy(min(3.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise


def liveness_failure(server: ServerProcess, stop: threading.Event, health_timeout_s: float = 3.0) -> str | None:
    """Block until the server fails a liveness probe and say why; None once `stop` is set. Its processes (the
    launcher, every scheduler) are checked every 0.2 s, `/health` (SGLang answers it by running a 1-token request)
    every 0.5 s from a thread of its own: two misses in a row fail it."""
    try:
        pids = [scheduler_pid(server.proc.pid, rank) for rank in range(server.tp_size)]
    except (RuntimeError, psutil.Error, AttributeError):
        return "a scheduler process is missing"
    done, misses = threading.Event(), [0]

    def probe_health() -> None:
        while not (stop.is_set() or done.is_set()):
            try:
                ok = requests.get(f"{server.url}/health", timeout=health_timeout_s).ok
            except requests.RequestException:
                ok = False
            misses[0] = 0 if ok else misses[0] + 1
            done.wait(0.5)

    threading.Thread(target=probe_health, daemon=True).start()
    try:
        while not stop.wait(0.2):
            if server.proc is None or server.proc.poll() is not None:
                return "launcher exited"
            for rank, pid in enumerate(pids):
                try:
                    gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                if gone:
                    return f"scheduler TP{rank} exited"
            if misses[0] >= 2:
                return "/health missed twice"
        return None
    finally:
        done.set()


def probe_until_success(url_of, stop: threading.Event, out: list) -> None:
    """A one-token request, re-sent every 0.1 s until one succeeds; appends (sent, succeeded) to `out`."""
    body = {"text": "probe after the fault", "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
    while not stop.is_set():
        sent = time.monotonic()
        try:
            if requests.post(f"{url_of()}/generate", json=body, timeout=(2, 30)).ok:
                out.append((sent, time.monotonic()))
                return
        except requests.RequestException:
            pass
        stop.wait(0.1)


class RestartAndReload:
    """Plain SGLang under a supervisor (see the module docstring). Devices are named by launch id, as in the trace;
    the server's TP ranks are the good devices in order."""

    def __init__(self, model: str, tp: int, widen: str):
        self.model, self.widen = model, widen
        self.good = set(range(tp))  # devices the health monitor (the trace's events) reports good
        self.slots = list(range(tp))  # TP rank -> device, of the server running or starting
        self.lock = threading.Lock()
        self.cancel = threading.Event()  # cancels the launch in progress
        self.watching = threading.Event()  # ends the liveness watch of the server serving
        self.stop = threading.Event()
        self.current = CancellableServer(model, tp_size=tp, cancel=self.cancel)  # serving or starting
        self.serving: ServerProcess = self.current
        self.restarts: list[dict] = []
        self.t0 = 0.0
        self.thread: threading.Thread | None = None

    def start(self) -> "RestartAndReload":
        self.current.start()
        return self

    def url(self) -> str:
        return self.serving.url

    def pid_of(self, worker: int) -> int | None:
        with self.lock:
            if worker not in self.slots or self.current.proc is None:
                return None
            server_pid, rank = self.current.proc.pid, self.slots.index(worker)
        return scheduler_pid_of(server_pid)(rank)

    def on_event(self, record: dict) -> None:
        """A device failed: out of the next launch, and the end of a launch in progress on it."""
        if record["event"] in FAULTS:
            with self.lock:
                self.good.discard(record["worker"])
                if record["worker"] in self.slots and self.current is not self.serving:
                    self.cancel.set()

    def rejoin(self, worker: int) -> None:
        with self.lock:
            self.good.add(worker)
            if self.widen == "immediate":
                self.watching.set()
                self.cancel.set()

    def run(self) -> "RestartAndReload":
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._supervise, daemon=True)
        self.thread.start()
        return self

    def _supervise(self) -> None:
        while True:
            reason = liveness_failure(self.serving, self.watching)
            if self.stop.is_set():
                return
            reason, detected = reason or "widen: a device came back", time.monotonic()
            self.serving.stop(grace_s=2.0)
            while True:
                with self.lock:
                    if self.stop.is_set():
                        return
                    self.cancel.clear()
                    self.watching = threading.Event()
                    self.slots = sorted(self.good)
                    self.current = CancellableServer(self.model, tp_size=len(self.slots), cancel=self.cancel)
                entry = {"detected_s": round(detected - self.t0, 3), "reason": reason, "tp": len(self.slots),
                         "devices": list(self.slots), "launched_s": round(time.monotonic() - self.t0, 3)}
                print(f"[under_faults] restart-and-reload: {reason}; relaunching at TP {len(self.slots)} on devices "
                      f"{self.slots}", flush=True)
                try:
                    self.current.start()
                except (RuntimeError, TimeoutError) as exc:
                    self.restarts.append({**entry, "outcome": f"failed: {str(exc).splitlines()[0]}"})
                    reason = "relaunch failed"
                    continue
                self.restarts.append({**entry, "outcome": "healthy", "startup_s": round(self.current.startup_s, 1),
                                      "healthy_s": round(time.monotonic() - self.t0, 3)})
                print(f"[under_faults] restart-and-reload: healthy at TP {len(self.slots)} after "
                      f"{self.current.startup_s:.1f} s", flush=True)
                with self.lock:
                    self.serving = self.current
                break

    def close(self) -> None:
        with self.lock:
            self.stop.set()
            self.watching.set()
            self.cancel.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        for server in (self.current, self.serving):
            server.stop()


# ---------------------------------------------------------------- one system's run

def drive(url_of, trace: FaultTrace, offsets: list[float], args, *, replay_kwargs: dict, on_event=None,
          down: threading.Event | None = None) -> dict:
    """The load and the trace's replay together for the window (or until `down`: then nothing more is sent and
    nothing drained), then the drain; returns the raw run (see under_faults_measures)."""
    load = OpenLoad(url_of, PROMPTS, args.max_new_tokens, offsets, read_timeout_s=args.read_timeout_s).start()
    stop, probes, replayed = threading.Event(), [], []

    def event(record: dict) -> None:
        if on_event is not None:
            on_event(record)
        print(format_record(record), flush=True)
        if delivered(record):
            threading.Thread(target=probe_until_success, args=(url_of, stop, probes), daemon=True).start()

    thread = threading.Thread(target=lambda: replayed.extend(
        replay(trace, on_event=event, stop=stop, **replay_kwargs)), daemon=True)
    thread.start()
    end = load.t0 + trace.header.window_s
    while time.monotonic() < end and not (down is not None and down.is_set()):
        time.sleep(0.2)
    was_down = down is not None and down.is_set()
    if was_down:
        stop.set()
    records = load.finish(0.0 if was_down else args.drain_s)
    ended = time.monotonic()
    stop.set()
    thread.join(timeout=30)
    return {"t0": load.t0, "ended": ended, "records": records, "replay": replayed, "probes": list(probes)}


def measure_ft(model: str, trace: FaultTrace, offsets: list[float], args) -> dict:
    extra = ["--ft-enable-fault-injection"] + (["--ft-respawn"] if args.ft_respawn else [])
    server = ServerProcess(model, tp_size=args.tp, ft=True, extra_args=extra).start()
    try:
        run = drive(lambda: server.url, trace, offsets, args, replay_kwargs={"url": server.url})
        try:
            status = requests.get(f"{server.url}/ft/status", timeout=30).json()
        except requests.RequestException:  # every worker died (a trace harsher than the restarts can follow)
            run["system"] = {"startup_s": round(server.startup_s, 1), "down": "server gone by the end of the run"}
            return run
        run["system"] = {"startup_s": round(server.startup_s, 1), "tp_size_at_end": status["tp_size"],
                         "recoveries": [{k: r.get(k) for k in ("epoch", "cause", "detect_ms", "recover_ms",
                                                               "kv_blocks_restored", "kv_tokens_recomputed",
                                                               "joined")} for r in status["recoveries"]]}
        return run
    finally:
        server.stop()


def measure_rr(model: str, trace: FaultTrace, offsets: list[float], args) -> dict:
    system = RestartAndReload(model, args.tp, args.rr_widen).start()
    startup_s = system.serving.startup_s
    try:
        system.run()
        run = drive(system.url, trace, offsets, args, on_event=system.on_event,
                    replay_kwargs={"pid_of": system.pid_of, "rejoin": system.rejoin})
        run["system"] = {"startup_s": round(startup_s, 1), "widen": args.rr_widen, "restarts": system.restarts}
        return run
    finally:
        system.close()


def measure_none(model: str, trace: FaultTrace, offsets: list[float], args) -> dict:
    server = ServerProcess(model, tp_size=args.tp).start()
    down, stop, why = threading.Event(), threading.Event(), {}

    def watch() -> None:
        why["reason"] = liveness_failure(server, stop)
        why["at"] = time.monotonic()
        down.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        run = drive(lambda: server.url, trace, offsets, args, down=down,
                    replay_kwargs={"pid_of": scheduler_pid_of(server.proc.pid)})
        run["system"] = {"down": why.get("reason"), "down_s": round(why["at"] - run["t0"], 3) if "at" in why else None}
        return run
    finally:
        stop.set()
        server.stop(grace_s=2.0)


MEASURE = {"ft": measure_ft, "rr": measure_rr, "none": measure_none}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="3 min window, more faults (hangs too), longer drain")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--trace", type=Path, help="a fault trace file (default: drawn by ft/fault_trace.py)")
    parser.add_argument("--rate", type=float, help="requests/s (quick 1.5)")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--drain-s", type=float, help="after the window, wait this long for requests in flight")
    parser.add_argument("--read-timeout-s", type=float, default=20.0, help="an attempt silent this long fails")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0)
    parser.add_argument("--slo-tpot-s", type=float, default=0.5)
    parser.add_argument("--ft-respawn", action="store_true", help="sglang-ft also restarts dead workers itself")
    parser.add_argument("--rr-widen", choices=("next-restart", "immediate"), default="next-restart")
    parser.add_argument("--systems", default="ft,rr,none", help="which systems, comma-separated (ft, rr, none)")
    parser.add_argument("--min-fault-gap-s", type=float, default=0.0,
                        help="pace the trace: faults at least this far apart (0: as drawn; a paced run gives "
                             "restart-and-reload time to relaunch between faults)")
    parser.add_argument("--reanalyse", type=Path, metavar="RESULTS_JSON",
                        help="recompute the counts, ratios, table and plot of a stored run (no server)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sglang-ft-bench-model-12h"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.out)
    preset = dict(PRESETS["full" if args.full else "quick"])
    for key in ("rate", "max_new_tokens", "drain_s"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    systems = [k for k in args.systems.split(",") if k]
    if any(k not in SYSTEMS for k in systems):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}")
    trace = load_trace(args.trace) if args.trace else make_trace(args.tp, preset)
    if trace.header.tp_size != args.tp:
        parser.error(f"the trace is for TP {trace.header.tp_size}, not --tp {args.tp}")
    if args.min_fault_gap_s < 0:
        parser.error("--min-fault-gap-s must be >= 0")
    if args.min_fault_gap_s:
        trace = paced(trace, args.min_fault_gap_s)
    window_s = trace.header.window_s
    offsets = arrival_times(args.rate, window_s, args.seed, args.arrivals)
    make_tiny_model.ensure_model(args.model_dir, *BENCH_MODEL_FLAGS)
    counts = {e: sum(x.event == e for x in trace.events) for e in ("kill", "hang", "resume", "rejoin")}
    summary = ", ".join(f"{n} {e}" for e, n in counts.items() if n)
    print(f"[under_faults] TP {args.tp}, {len(offsets)} requests over {window_s:g} s ({args.rate} req/s "
          f"{args.arrivals}), trace: {summary}", flush=True)

    slo = (args.slo_ttft_s, args.slo_tpot_s)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": "tiny llama, 12 heads / 12 KV heads, 2 layers (random weights)",
        "config": {"tp": args.tp, "window_s": window_s, "rate": args.rate, "arrivals": args.arrivals,
                   "seed": args.seed, "requests": len(offsets), "max_new_tokens": args.max_new_tokens,
                   "drain_s": args.drain_s, "read_timeout_s": args.read_timeout_s, "slo_ttft_s": slo[0],
                   "slo_tpot_s": slo[1], "ft_respawn": args.ft_respawn, "rr_widen": args.rr_widen,
                   "form": "full" if args.full else "quick", "trace_summary": summary,
                   "min_fault_gap_s": args.min_fault_gap_s},
        "trace": {"text": dumps_trace(trace).splitlines(), "events": [asdict(e) for e in trace.events]},
        "systems": {},
    }
    for key in systems:
        print(f"[under_faults] === {SYSTEMS[key]} ===", flush=True)
        run = MEASURE[key](str(args.model_dir), trace, offsets, args)
        result = summarize(run, window_s, slo)
        result["system"] = run["system"]
        result["replay"] = [{k: v for k, v in r.items() if k != "at"} for r in run["replay"]]
        result["requests_detail"] = [
            {"arrival_s": round(r.arrival - run["t0"], 3), "sent": r.sent, "ttft_s": _round(r.ttft),
             "tpot_s": _round(r.tpot, 4), "done_s": _round(r.done and r.done - run["t0"]), "tokens": r.tokens,
             "failed_attempts": r.failed_attempts, "lost": r.lost} for r in run["records"]]
        report["systems"][key] = result
        print(f"[under_faults] {SYSTEMS[key]}: {result['throughput_tokens_per_s']} tokens/s, "
              f"{result['completed']}/{result['requests']} completed, {result['lost']} lost, "
              f"recovery {[r['latency_s'] for r in result['recovery']]}", flush=True)
    if "ft" in report["systems"] and "rr" in report["systems"]:
        report["ratios"] = ratios(report["systems"]["ft"], report["systems"]["rr"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "under_faults.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "under_faults.png")
    print(table(report))
    return report


def reanalyse(path: Path, out: Path) -> dict:
    """Recompute what a stored run reports from its per-fault records (the measures changed after it ran: a fault
    not delivered is no longer a recovery); writes the report, its plot and table beside the originals' names with
    a `reanalysed` stamp."""
    report = json.loads(path.read_text())
    for result in report["systems"].values():
        kept = [r for r in result["recovery"] if delivered(r)]
        result["faults_not_delivered"] = [{k: r[k] for k in ("t_s", "worker", "event", "outcome")}
                                          for r in result["recovery"] if not delivered(r)]
        result["recovery"] = kept
        end = max((t for t, _ in result["series"]), default=report["config"]["window_s"])
        result["mean_recovery"] = mean_recovery([r["t_s"] for r in kept], [r["latency_s"] for r in kept], end)
    if "ft" in report["systems"] and "rr" in report["systems"]:
        report["ratios"] = ratios(report["systems"]["ft"], report["systems"]["rr"])
    report["reanalysed"] = {"date": dt.date.today().isoformat(), "of_run_dated": report["date"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "under_faults.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "under_faults.png")
    print(table(report))
    return report


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


if __name__ == "__main__":
    main()
