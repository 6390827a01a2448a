"""Balance after a failure: what each worker holds and does, at TP 4 and at TP 3 after one worker is killed, for
every layout variant side by side in one run.

    python benchmark/balance.py [--kv-heads 8] [--clients 8] [--duration-s 20] [--variants tp,hybrid-load,...]

After 1 of 4 workers fails, 8 KV heads over 3 workers are 3 + 3 + 2 with TP attention (`--ft-attention tp`): the
wider workers hold more KV bytes for the same tokens (they fill first and cap the batch) and do more attention work
(every step waits for them). With `--ft-kv-placement cyclic` every worker runs 2 heads by TP and the other 2 heads'
KV rotates over all workers token by token, their attention merged across them; with `--ft-attention hybrid` the
other 2 heads of each request run whole on one owner, chosen by `--ft-routing` (round_robin, load, prefix_load).

Each variant gets its own server; each phase (TP 4 fault-free, then TP 3 after a SIGKILL) runs a closed loop of
`--clients` greedy requests on a shared-prefix workload of mixed lengths for `--duration-s`, sampling `/ft/status`
every 0.25 s:
- KV max/min: the ratio of the workers' `kv_bytes_used` (TP heads' and remainder heads' rows), median over samples
  (target <= 1.05; the naive layout is expected >= 1.33), and how far apart they are in blocks (16 tokens of one
  KV head), median and worst sample;
- slowest/mean busy: each worker's forward time outside TP collectives over the phase (`busy_ms_total`), the
  slowest against the mean (target <= 1.10);
- throughput after / before the failure (target >= 0.9 x 3/4); on 2 shared cores TP 3 can beat TP 4, so this
  ratio says little here;
- prefix cache hit rate: cached prompt tokens / prompt tokens (SGLang's `cached_tokens`), and under hybrid
  attention the cached-prefix rows copied to a request's owner from the worker that computed them (what
  `prefix_load` saves over `round_robin`).
Writes benchmark/results/balance.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import requests
from ft.kv_backup import BLOCK_TOKENS
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.server_process import ServerProcess

PREFIXES = ["You are a careful assistant for a fault-tolerant model server. ",
            "Summarise the following incident report about a failed GPU in one line. "]
LENGTHS = (8, 32, 96)  # mixed output lengths


def request_body(n: int) -> dict:
    prefix = PREFIXES[n % len(PREFIXES)] * 2
    return {"text": f"{prefix}Question {n}: what happened to worker {n % 4}?",
            "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": LENGTHS[n % len(LENGTHS)]}}


def status(url: str) -> dict:
    return requests.get(f"{url}/ft/status", timeout=30).json()


def members(st: dict) -> list[dict]:
    return sorted((w for w in st["workers"] if w["rank"] is not None and "kv_bytes_used" in w),
                  key=lambda w: w["rank"])


def run_phase(url: str, clients: int, duration_s: float) -> dict:
    """A closed loop of `clients` for `duration_s`, sampling every worker's load meanwhile."""
    tokens, failures, samples, prompt = [0], [0], [], [0, 0]  # prompt: [tokens, cached tokens]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(index: int) -> None:
        n = index
        while time.monotonic() < stop_at:
            body = request_body(n)
            meta = {}
            try:
                response = requests.post(f"{url}/generate", json=body, timeout=300)
                ok = response.ok
                meta = response.json()["meta_info"] if ok else {}
            except requests.RequestException:
                ok = False
            with lock:
                tokens[0] += body["sampling_params"]["max_new_tokens"] if ok else 0
                failures[0] += not ok
                prompt[0] += meta.get("prompt_tokens", 0)
                prompt[1] += meta.get("cached_tokens", 0)
            n += clients

    before = members(status(url))
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    while time.monotonic() < stop_at:
        workers = members(status(url))
        used = [w["kv_bytes_used"] for w in workers]
        if used and min(used) > 0:
            samples.append((max(used) / min(used), (max(used) - min(used)) / block_bytes(workers[0])))
        time.sleep(0.25)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {**summarize_phase(before, members(status(url)), samples), "tokens_per_s": round(tokens[0] / elapsed, 1),
            "failures": failures[0], "prefix_hit_rate": round(prompt[1] / prompt[0], 3) if prompt[0] else None}


def block_bytes(worker: dict) -> int:
    """One KV block: 16 tokens of one KV head, every layer's K and V."""
    return BLOCK_TOKENS * worker["kv_bytes_per_token"] // worker["kv_heads"]


def summarize_phase(before: list[dict], after: list[dict], samples: list[tuple[float, float]]) -> dict:
    """The phase's balance from the workers' status at its start and end and the KV samples taken in it: (max/min
    ratio, max - min in blocks) of the workers' KV bytes used."""
    kv_ratios, kv_blocks_apart = [r for r, _ in samples], [b for _, b in samples]
    busy = [a["busy_ms_total"] - b["busy_ms_total"] for a, b in zip(after, before, strict=True)]
    return {
        "tp": len(after),
        "kv_heads": [w["kv_heads"] for w in after],
        "remainder_kv_heads": [w.get("remainder_kv_heads", 0) for w in after],
        "kv_max_min_ratio": round(statistics.median(kv_ratios), 3) if kv_ratios else None,
        "kv_samples": len(kv_ratios),
        # how far apart the workers' KV bytes are, in blocks (16 tokens of one KV head): median and worst sample
        "kv_blocks_apart_median": round(statistics.median(kv_blocks_apart), 2) if kv_blocks_apart else None,
        "kv_blocks_apart_max": round(max(kv_blocks_apart), 2) if kv_blocks_apart else None,
        "busy_ms": [round(b, 1) for b in busy],
        "busy_slowest_mean_ratio": round(max(busy) / statistics.mean(busy), 3) if busy and all(busy) else None,
        # hybrid attention: cached-prefix rows sent to a request's owner because another worker computed them
        "remainder_rows_copied": sum(a.get("remainder_rows_copied", 0) - b.get("remainder_rows_copied", 0)
                                     for a, b in zip(after, before, strict=True) if a["rank"] == b["rank"]),
    }


VARIANTS = {  # name -> the server's FT flags
    "tp": [],  # contiguous: 3 + 3 + 2 heads
    "cyclic": ["--ft-kv-placement", "cyclic"],
    "hybrid-round_robin": ["--ft-attention", "hybrid", "--ft-routing", "round_robin"],
    "hybrid-load": ["--ft-attention", "hybrid", "--ft-routing", "load"],
    "hybrid-prefix_load": ["--ft-attention", "hybrid", "--ft-routing", "prefix_load"],
}


def run_variant(model: Path, name: str, clients: int, duration_s: float) -> dict:
    """One server at TP 4: a fault-free phase, a SIGKILL of one worker, a phase at TP 3."""
    flags = ["--ft-enable-fault-injection", *VARIANTS[name]]
    with ServerProcess(str(model), tp_size=4, ft=True, extra_args=flags) as server:
        run_phase(server.url, clients, 3.0)  # warm-up: first batches, caches
        before = run_phase(server.url, clients, duration_s)
        print(f"{name} TP 4: {before}", flush=True)
        requests.post(f"{server.url}/ft/inject_fault", json={"rank": 3, "kind": "kill"}, timeout=30).raise_for_status()
        deadline = time.monotonic() + 120
        while (st := status(server.url))["tp_size"] != 3 or st["regrouping"] is not None or len(members(st)) != 3:
            if time.monotonic() > deadline:
                raise SystemExit("the group did not regroup to TP 3 within 120 s")
            time.sleep(0.5)
        after = run_phase(server.url, clients, duration_s)
        print(f"{name} TP 3: {after}", flush=True)
    return {"flags": VARIANTS[name], "before": before, "after": after,
            "throughput_after_before": round(after["tokens_per_s"] / before["tokens_per_s"], 3)
            if before["tokens_per_s"] else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads of the tiny model (8: 3+3+2 at TP 3)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--model-dir", type=Path, help="default: a tiny Llama with --kv-heads KV heads, made once")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration_s <= 0:
        parser.error("--clients and --duration-s must be positive")
    if args.kv_heads < 4:
        parser.error("--kv-heads must be at least 4 (TP 4 needs a KV head per worker)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    model = args.model_dir or Path.home() / f".cache/sglang-ft/models/tiny-llama-{args.kv_heads}kv"
    make_tiny_model.ensure_model(model, "--num-attention-heads", str(args.kv_heads),
                                 "--num-key-value-heads", str(args.kv_heads))

    results = {name: run_variant(model, name, args.clients, args.duration_s) for name in variants}
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "kv_heads": args.kv_heads, "clients": args.clients, "duration_s": args.duration_s,
        "variants": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "balance.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
