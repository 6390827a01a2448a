"""`make demo`: serve the tiny model with `--ft` at TP 4 under a steady load, kill a worker, watch it recover.

    python -m sglang_ft.demo [--tp-size 4] [--clients 6] [--before-s 15] [--after-s 25] [--out demo-output]
    python -m sglang_ft.demo --url http://127.0.0.1:30000 --model-dir MODEL   # against a running --ft server

It launches `python -m sglang.launch_server --ft` exactly as a user would (or uses the server at `--url`, which it
neither starts nor stops), runs closed-loop streaming greedy
clients, SIGKILLs one scheduler process (as a dying GPU would take it) and prints a live view: requests served,
throughput, the failure detected, the regroup to TP 3 and its recovery time. It ends with a summary (zero lost,
every output equal to HuggingFace transformers, throughput before and after) and a plot of throughput over time
with the failure marked, then stops the server; no process is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import requests

from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.hf_reference import greedy_token_ids
from sglang_ft.tools.load import Load, longest_gap, rate_series
from sglang_ft.tools.server_process import ServerProcess, leftover_processes

DEMO_PROMPTS = [
    "The model server",
    "Heartbeat epoch recover restart reload weights",
    "Tell me a story about a quiet river",
    "rank tensor parallel group heads cache prefix radix failure",
    "one two three",
    "The worker sends a heartbeat to the store",
    "Seven blue mountains and a bright city",
    "What is the next token",
]


def ft_status(url: str) -> dict:
    return requests.get(f"{url}/ft/status", timeout=10).json()


class LiveView:
    """One line a second: what the clients see and what the controller says, plus every new FT event."""

    def __init__(self, load: Load, url: str, started: float):
        self.load, self.url, self.started = load, url, started
        first = ft_status(url)  # events from before the demo (a server at --url) are not news
        self.detections_seen, self.recoveries_seen = len(first["detections"]), len(first["recoveries"])
        self.last_tick, self.last_tokens = started, 0

    def tick(self) -> dict:
        status = ft_status(self.url)
        now = time.monotonic()
        with self.load.lock:
            tokens, served = len(self.load.tokens), self.load.completed
        rate = (tokens - self.last_tokens) / max(1e-9, now - self.last_tick)
        self.last_tick, self.last_tokens = now, tokens
        live = sum(w["rank"] is not None for w in status["workers"])
        print(f"[demo] t={now - self.started:5.1f}s  served {served:4d}  {rate:6.1f} tok/s  "
              f"epoch {status['epoch']}  TP {status['tp_size']} ({live}/{len(status['workers'])} workers)",
              flush=True)
        for detection in status["detections"][self.detections_seen:]:
            if detection["state"] != "dead":  # a busy 2-core machine makes workers briefly suspect; not news
                continue
            print(f"[demo]   >> worker {detection['worker']} {detection['state']} ({detection['cause']}, "
                  f"silent {detection['silent_ms']:.0f} ms)", flush=True)
        for recovery in status["recoveries"][self.recoveries_seen:]:
            print(f"[demo]   >> regrouped in place to TP {status['tp_size']} (epoch {recovery['epoch']}): "
                  f"detected in {recovery['detect_ms']:.0f} ms, recovered in {recovery['recover_ms']:.0f} ms, "
                  f"{recovery['kv_blocks_restored']} KV blocks restored, "
                  f"{recovery['kv_tokens_recomputed']} tokens recomputed", flush=True)
        self.detections_seen, self.recoveries_seen = len(status["detections"]), len(status["recoveries"])
        return status


def plot_throughput(load: Load, started: float, fault_at: float, recovered_at: float | None, ended: float,
                    title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = rate_series(load.tokens, started, ended)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in series], [r for _, r in series], color="tab:blue", label="tokens/s (1 s window)")
    ax.axvline(fault_at - started, color="tab:red", linestyle="--", label="worker SIGKILLed")
    if recovered_at is not None:
        ax.axvspan(fault_at - started, recovered_at - started, color="tab:red", alpha=0.15, label="detect + regroup")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"sglang-ft: throughput through a worker failure ({title}, tiny model on CPU)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_ft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--tp-size", type=int, default=4)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--before-s", type=float, default=15.0, help="steady load before the failure")
    parser.add_argument("--after-s", type=float, default=25.0, help="load after the failure")
    parser.add_argument("--kill-rank", type=int, default=2, help="the TP rank whose scheduler process is killed")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where the plot and summary go")
    parser.add_argument("--url", help="a running --ft server of --model-dir's model to use instead of launching one "
                                      "(left running; --tp-size is read from it)")
    args = parser.parse_args(argv)
    if args.url:
        args.tp_size = tp_size_at(parser, args.url)
    if args.tp_size < 2:
        parser.error("--tp-size must be at least 2 (a worker is killed)")
    if not 0 <= args.kill_rank < args.tp_size:
        parser.error(f"--kill-rank must be in [0, {args.tp_size - 1}]")
    if args.clients < 1 or args.max_new_tokens < 1 or args.before_s <= 0 or args.after_s <= 0:
        parser.error("--clients, --max-new-tokens, --before-s and --after-s must be positive")

    model = make_tiny_model.ensure_model(args.model_dir)
    print("[demo] greedy reference outputs from HuggingFace transformers ...", flush=True)
    expected = dict(zip(DEMO_PROMPTS, greedy_token_ids(str(model), DEMO_PROMPTS, args.max_new_tokens)))
    if args.url:
        print(f"[demo] using the --ft server at {args.url} (TP {args.tp_size}); it is left running", flush=True)
        return report(args, run(args.url, args, expected))
    print(f"[demo] launching: python -m sglang.launch_server --ft --model-path {model} --tp-size {args.tp_size}",
          flush=True)
    with ServerProcess(str(model), tp_size=args.tp_size, ft=True) as server:
        print(f"[demo] healthy in {server.startup_s:.1f}s at {server.url} (log: {server.log_path})", flush=True)
        server_group = server.proc.pid
        summary = run(server.url, args, expected)
    # what outlived the launcher's graceful exit (the stop then killed it), and anything that escaped the group
    summary["leftover_processes"] = sorted(set(server.stragglers + leftover_processes(server_group)))
    return report(args, summary)


def tp_size_at(parser, url: str) -> int:
    """The TP size of the `--ft` server at `url`; a parser error where there is none."""
    try:
        return int(ft_status(url)["tp_size"])
    except (requests.RequestException, KeyError, ValueError) as exc:
        parser.error(f"--url {url}: no --ft server answers /ft/status there ({exc})")


def report(args, summary: dict) -> int:
    """Write the summary, print the verdict; the exit status."""
    summary.setdefault("leftover_processes", [])  # a server at --url is not the demo's to stop
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] plot: {args.out / 'throughput.png'}   summary: {args.out / 'summary.json'}")
    ok = (summary["lost"] == 0 and summary["mismatched"] == 0 and summary["recovered"]
          and not summary["leftover_processes"])
    left = "the server left running" if args.url else f"no process left behind: {not summary['leftover_processes']}"
    print(f"[demo] {'OK' if ok else 'FAILED'}: {summary['served']} requests served, {summary['lost']} lost, "
          f"{summary['mismatched']} differing from transformers, {left}")
    return 0 if ok else 1


def run(url: str, args, expected: dict[str, list[int]]) -> dict:
    started = time.monotonic()
    load = Load(url, DEMO_PROMPTS, args.max_new_tokens, expected=expected).start(args.clients)
    view = LiveView(load, url, started)
    while time.monotonic() - started < args.before_s:
        time.sleep(1.0)
        status = view.tick()
    victim = next(w for w in status["workers"] if w.get("rank") == args.kill_rank)
    earlier = len(status["recoveries"])  # a server at --url may have recovered before
    fault_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    print(f"[demo] SIGKILL -> worker {victim['worker']} (TP rank {args.kill_rank}, pid {victim['pid']})", flush=True)
    recovered_at = None
    while time.monotonic() - fault_at < args.after_s:
        time.sleep(1.0)
        status = view.tick()
        if recovered_at is None and len(status["recoveries"]) > earlier:
            recovery = status["recoveries"][earlier]
            recovered_at = fault_at + (recovery["detect_ms"] + recovery["recover_ms"]) / 1e3
    ended = time.monotonic()
    load.finish()
    args.out.mkdir(parents=True, exist_ok=True)
    plot_throughput(load, started, fault_at, recovered_at, ended, f"TP {args.tp_size} -> {status['tp_size']}",
                    args.out / "throughput.png")
    before = load.tokens_between(started + 2, fault_at) / max(1e-9, fault_at - started - 2)
    after_from = recovered_at if recovered_at is not None else fault_at
    after = load.tokens_between(after_from + 1, ended) / max(1e-9, ended - after_from - 1)
    pause = longest_gap(load.tokens, fault_at)
    recovery = status["recoveries"][earlier] if len(status["recoveries"]) > earlier else {}
    print(f"[demo] served {load.completed} requests; failed attempts re-sent by clients: {load.failed_attempts}; "
          f"lost: {load.unfinished}")
    print(f"[demo] detection {recovery.get('detect_ms')} ms, regroup {recovery.get('recover_ms')} ms, "
          f"longest pause in the token stream {pause:.2f} s")
    print(f"[demo] throughput: {before:.1f} tok/s before (TP {args.tp_size}), {after:.1f} tok/s after "
          f"(TP {status['tp_size']}; on this CPU fewer rank processes share the cores, on GPUs expect less)")
    return {"served": load.completed, "lost": load.unfinished, "mismatched": load.mismatched,
            "failed_attempts": load.failed_attempts, "recovered": bool(recovery),
            "tp_after": status["tp_size"], "detect_ms": recovery.get("detect_ms"),
            "recover_ms": recovery.get("recover_ms"), "kv_blocks_restored": recovery.get("kv_blocks_restored"),
            "kv_tokens_recomputed": recovery.get("kv_tokens_recomputed"), "longest_pause_s": round(pause, 3),
            "tokens_per_s_before": round(before, 1), "tokens_per_s_after": round(after, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
