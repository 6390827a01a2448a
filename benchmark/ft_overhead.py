"""What `--ft` costs with no fault: throughput and latency of plain SGLang and `--ft` on the same load, one run.

    python benchmark/ft_overhead.py [--tp 2] [--clients 8] [--max-new-tokens 32] [--duration-s 20] [--rounds 1]
    python benchmark/ft_overhead.py --full        # 3 rounds of 60 s

Each round serves the same model once plain and once with `--ft` (heartbeats, the FT controller, KV backup
streaming to the store process: everything on by default), alternating which goes first so a drift of the
machine does not favour one. Each measurement: a closed loop of `--clients` greedy requests of
`--max-new-tokens` tokens for `--duration-s` after a warm-up; tokens/s and the p50/p99 of request latency, and the
CPU seconds the server's processes (every process of it: schedulers, the FT controller, the backup store) spent per
generated token: on a machine other work shares, throughput follows the other work, CPU time per token much less.
Target (issue 9): `--ft` loses at most 5% throughput. Writes benchmark/results/ft_overhead.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import requests
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.server_process import ServerProcess

PROMPTS = [f"Request {i}: every worker beats and streams its KV to the backup store while it serves"
           for i in range(32)]


def closed_loop(url: str, clients: int, max_new_tokens: int, duration_s: float) -> dict:
    """`clients` threads each sending one request after another for `duration_s`; per-request latencies."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(index: int) -> None:
        n = index
        while time.monotonic() < stop_at:
            body = {"text": PROMPTS[n % len(PROMPTS)],
                    "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": max_new_tokens}}
            started = time.monotonic()
            try:
                ok = requests.post(f"{url}/generate", json=body, timeout=300).ok
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.monotonic() - started)
                else:
                    failures[0] += 1
            n += clients

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {"requests": len(latencies), "failures": failures[0], "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(len(latencies) * max_new_tokens / elapsed, 1), "latencies": latencies}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and every live descendant."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(model: str, ft: bool, args) -> dict:
    with ServerProcess(model, tp_size=args.tp, ft=ft) as server:
        closed_loop(server.url, args.clients, args.max_new_tokens, 3.0)  # warm-up: first batches, caches
        before = cpu_seconds(server.proc.pid)
        run = closed_loop(server.url, args.clients, args.max_new_tokens, args.duration_s)
        tokens = run["requests"] * args.max_new_tokens
        run["cpu_ms_per_token"] = round((cpu_seconds(server.proc.pid) - before) * 1e3 / tokens, 2) if tokens else None
        return run


def summarize(runs: list[dict]) -> dict:
    latencies = [x for run in runs for x in run["latencies"]]
    tokens = sum(run["tokens_per_s"] * run["elapsed_s"] for run in runs)
    elapsed = sum(run["elapsed_s"] for run in runs)
    return {"tokens_per_s": round(tokens / elapsed, 1), "requests": len(latencies),
            "failures": sum(run["failures"] for run in runs),
            "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
            "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
            "per_round_tokens_per_s": [run["tokens_per_s"] for run in runs],
            "per_round_cpu_ms_per_token": [run.get("cpu_ms_per_token") for run in runs]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="3 rounds of 60 s")
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.full:
        args.rounds, args.duration_s = 3, 60.0
    if args.rounds < 1 or args.duration_s <= 0 or args.clients < 1:
        parser.error("--rounds, --duration-s and --clients must be positive")
    make_tiny_model.ensure_model(args.model_dir)

    runs: dict[str, list[dict]] = {"plain": [], "ft": []}
    for round_index in range(args.rounds):
        order = ("plain", "ft") if round_index % 2 == 0 else ("ft", "plain")
        for system in order:
            run = measure(str(args.model_dir), system == "ft", args)
            runs[system].append(run)
            print(f"round {round_index + 1} {system}: {run['tokens_per_s']} tok/s, {run['requests']} requests, "
                  f"{run['cpu_ms_per_token']} CPU ms per token, load average {os.getloadavg()[0]:.1f}", flush=True)
    plain, ft = summarize(runs["plain"]), summarize(runs["ft"])
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "tp": args.tp, "clients": args.clients, "max_new_tokens": args.max_new_tokens,
        "duration_s": args.duration_s, "rounds": args.rounds,
        "plain": plain, "ft": ft,
        "ft_throughput_ratio": round(ft["tokens_per_s"] / plain["tokens_per_s"], 3) if plain["tokens_per_s"] else None,
        # each round's --ft / plain: the spread shows how much of the difference is this machine's noise
        "per_round_ratios": [round(f["tokens_per_s"] / p["tokens_per_s"], 3)
                             for f, p in zip(runs["ft"], runs["plain"], strict=True) if p["tokens_per_s"]],
        "ft_p99_ratio": round(ft["latency_p99_s"] / plain["latency_p99_s"], 3)
        if ft["latency_p99_s"] and plain["latency_p99_s"] else None,
        # --ft's extra work per token, whatever else the machine ran: its CPU time per token over plain's
        "ft_cpu_per_token_ratio": _ratio(ft["per_round_cpu_ms_per_token"], plain["per_round_cpu_ms_per_token"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ft_overhead.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def _ratio(ft_rounds: list, plain_rounds: list) -> float | None:
    ft_rounds, plain_rounds = [x for x in ft_rounds if x], [x for x in plain_rounds if x]
    if not ft_rounds or not plain_rounds:
        return None
    return round(sum(ft_rounds) / len(ft_rounds) / (sum(plain_rounds) / len(plain_rounds)), 3)


def table(report: dict) -> str:
    plain, ft = report["plain"], report["ft"]
    lines = [f"| TP {report['tp']}, {report['clients']} clients, {report['rounds']} x {report['duration_s']:.0f} s "
             f"| plain SGLang | --ft |", "|---|---|---|"]
    for label, key in (("tokens/s", "tokens_per_s"), ("requests", "requests"), ("failures", "failures"),
                       ("latency p50 (s)", "latency_p50_s"), ("latency p99 (s)", "latency_p99_s")):
        lines.append(f"| {label} | {plain[key]} | {ft[key]} |")
    lines.append(f"\n--ft / plain throughput {report['ft_throughput_ratio']} (target >= 0.95; per round "
                 f"{report.get('per_round_ratios')}), p99 latency ratio {report['ft_p99_ratio']}, CPU time per "
                 f"token ratio {report.get('ft_cpu_per_token_ratio')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
