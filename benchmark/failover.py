"""Failover under steady load: sglang-ft's in-place regroup against restart-and-reload, measured in one run.

    python benchmark/failover.py [--tp 4] [--clients 8] [--max-new-tokens 32] [--before-s 10] [--after-s 90]

Both systems serve the same model (12 heads, 12 KV heads, so plain SGLang also runs at TP N-1) under the same
closed-loop load of streaming greedy requests, and lose TP rank 2 to a SIGKILL after `--before-s`:

- sglang-ft: `--ft` at TP N; the controller detects the death, the survivors regroup in place to TP N-1 with the
  dead worker's KV heads from the backup store; clients see nothing but a pause.
- restart-and-reload: plain SGLang at TP N under a supervisor that checks the process and `/health` like a
  liveness probe, stops what is left, relaunches at TP N-1 (weights reloaded from disk) and lets the clients
  re-send every request that failed (re-prefilled from scratch).

Reported per system: TFS (time to first success: a probe request sent at the fault, retried until it succeeds,
answers its first token), TTP (time to
peak: fault until the 1 s throughput first reaches 90% of its steady level, the mean over the last 30% of the
run), detection latency,
requests lost (accepted but never completed), failed attempts seen by clients, bytes moved, throughput before
and after. Writes benchmark/results/failover.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import requests
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.load import Load, rate_series, scheduler_pid
from sglang_ft.tools.server_process import ServerProcess

PROMPTS = [f"Request {i}: the tensor parallel group serves tokens while a worker may fail at any time"
           for i in range(64)]
BENCH_MODEL_FLAGS = ["--hidden-size", "96", "--num-attention-heads", "12", "--num-key-value-heads", "12",
                     "--intermediate-size", "192", "--seed", "3"]


def probe_first_success(load: Load, fault_at: float, out: dict) -> None:
    """From the fault on, send a one-token request (retried) until one succeeds; record when."""
    body = {"text": "probe after the fault", "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
    while not load.stop.is_set():
        try:
            if requests.post(f"{load.url}/generate", json=body, timeout=(2, 120)).ok:
                out["tfs_s"] = round(time.monotonic() - fault_at, 3)
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)


def summarize(load: Load, started: float, fault_at: float, ended: float) -> dict:
    before = [t for t in load.tokens if started + 2 <= t < fault_at]
    after = [t for t in load.tokens if t >= fault_at]
    series = rate_series(load.tokens, fault_at, ended)
    tail = [r for s, r in series if s >= (ended - fault_at) * 0.7]
    steady = sum(tail) / len(tail) if tail else 0.0
    ttp = next((s for s, r in series if r >= 0.9 * steady), None) if steady else None
    return {
        "first_token_after_fault_s": round(after[0] - fault_at, 3) if after else None,
        "ttp_s": ttp,
        "tokens_per_s_before": round(len(before) / max(1e-9, fault_at - started - 2), 1),
        "tokens_per_s_steady_after": round(steady, 1),
        "completed": load.completed,
        "failed_attempts": load.failed_attempts,
        "lost_requests": load.unfinished,
        "throughput_after_fault": series,
    }


def run_load(url_of, clients: int, max_new_tokens: int, before_s: float, after_s: float, fault) -> dict:
    started = time.monotonic()
    load = Load(url_of(), PROMPTS, max_new_tokens).start(clients)
    time.sleep(before_s)
    fault_at = time.monotonic()
    extra = fault(load)
    first_success: dict = {"tfs_s": None}
    probe = threading.Thread(target=probe_first_success, args=(load, fault_at, first_success), daemon=True)
    probe.start()
    time.sleep(max(0.0, fault_at + after_s - time.monotonic()))
    ended = time.monotonic()
    load.finish()
    probe.join(timeout=180)
    return {**summarize(load, started, fault_at, ended), **first_success, **extra}


def measure_sglang_ft(model: str, args) -> dict:
    server = ServerProcess(model, tp_size=args.tp, ft=True, extra_args=["--ft-enable-fault-injection"]).start()
    try:
        def fault(_load):
            requests.post(f"{server.url}/ft/inject_fault", json={"rank": 2, "kind": "kill"}, timeout=30)
            return {}

        result = run_load(lambda: server.url, args.clients, args.max_new_tokens, args.before_s, args.after_s, fault)
        status = requests.get(f"{server.url}/ft/status", timeout=30).json()
        recovery = status["recoveries"][0]
        result.update(
            startup_s=round(server.startup_s, 1),
            detect_ms=recovery["detect_ms"],
            recover_ms=recovery["recover_ms"],
            bytes_moved=recovery["bytes_p2p"] + recovery["bytes_reloaded"] + recovery.get("bytes_from_host_cache", 0)
            + recovery.get("kv_bytes_p2p", 0),
            kv_blocks_restored=recovery["kv_blocks_restored"],
            kv_tokens_recomputed=recovery["kv_tokens_recomputed"],
            stage_ms=recovery["stage_ms"],
        )
        return result
    finally:
        server.stop()


def measure_restart_and_reload(model: str, args) -> dict:
    holder = {"server": ServerProcess(model, tp_size=args.tp).start()}
    first_startup = holder["server"].startup_s
    timings: dict = {}

    def supervise(fault_at: float, load: Load) -> None:
        server = holder["server"]
        while True:  # a liveness probe: the process exited, or /health failed twice in a row
            misses = 0
            while server.proc.poll() is None and misses < 2:
                try:
                    misses = 0 if requests.get(f"{server.url}/health", timeout=1).ok else misses + 1
                except requests.RequestException:
                    misses += 1
                time.sleep(0.1 if misses else 0.25)
            break
        timings["detect_ms"] = round((time.monotonic() - fault_at) * 1e3, 1)
        server.stop()
        restarted = ServerProcess(model, tp_size=args.tp - 1).start()
        timings["restart_s"] = round(restarted.startup_s, 1)
        holder["server"] = restarted
        load.url = restarted.url  # clients re-send failed requests here

    def fault(load: Load):
        os.kill(scheduler_pid(holder["server"].proc.pid, 2), signal.SIGKILL)
        thread = threading.Thread(target=supervise, args=(time.monotonic(), load), daemon=True)
        thread.start()
        holder["supervisor"] = thread
        return {}

    try:
        result = run_load(lambda: holder["server"].url, args.clients, args.max_new_tokens, args.before_s,
                          args.after_s, fault)
        checkpoint = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
        result.update(startup_s=round(first_startup, 1), bytes_moved=checkpoint, **timings)
        return result
    finally:
        if "supervisor" in holder:  # a relaunch still under way would leave its server running
            holder["supervisor"].join(timeout=300)
        holder["server"].stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--before-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=90.0)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sglang-ft-bench-model-12h"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    make_tiny_model.ensure_model(args.model_dir, *BENCH_MODEL_FLAGS)
    model = str(args.model_dir)

    ft = measure_sglang_ft(model, args)
    baseline = measure_restart_and_reload(model, args)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": "tiny llama, 12 heads / 12 KV heads, 2 layers (random weights)",
        "tp": f"{args.tp} -> {args.tp - 1}",
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "tfs_ratio": round(baseline["tfs_s"] / ft["tfs_s"], 1) if ft["tfs_s"] and baseline["tfs_s"] else None,
        "ttp_reduction": round(1 - ft["ttp_s"] / baseline["ttp_s"], 3) if ft["ttp_s"] and baseline["ttp_s"] else None,
        "detect_ms": ft["detect_ms"],
        "lost_requests": ft["lost_requests"],
        "sglang_ft": ft,
        "restart_and_reload": baseline,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failover.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    ft, base = report["sglang_ft"], report["restart_and_reload"]
    rows = [("TFS (s)", "tfs_s"), ("TTP (s)", "ttp_s"), ("detection (ms)", "detect_ms"),
            ("requests lost", "lost_requests"), ("failed attempts seen by clients", "failed_attempts"),
            ("bytes moved or reloaded", "bytes_moved"), ("tokens/s before the fault", "tokens_per_s_before"),
            ("tokens/s steady after", "tokens_per_s_steady_after")]
    lines = [f"| TP {report['tp']}, {report['clients']} clients | sglang-ft | restart-and-reload |", "|---|---|---|"]
    lines += [f"| {label} | {ft.get(key)} | {base.get(key)} |" for label, key in rows]
    lines.append(f"\nTFS ratio {report['tfs_ratio']}x, TTP reduction {report['ttp_reduction']:.0%}"
                 if report["ttp_reduction"] is not None else f"\nTFS ratio {report['tfs_ratio']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
