"""`make bench`: the quick forms (about 9 minutes on 2 cores), then one summary table of what this run measured.

    python benchmark/bench_all.py            # quick forms; results in benchmark/results/quick/
    python benchmark/bench_all.py --full     # the full forms (--full, or a script's defaults); benchmark/results/

Each benchmark runs as its own process (a failure in one is reported and the others still run) and writes its
JSON; the summary reads those files, so it shows exactly what was measured in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name, script, quick arguments (None: only in the full run), full arguments
BENCHMARKS = [
    ("scale model", "scale_model.py", [], ["--full"]),
    ("throughput", "throughput.py", None, []),  # --ft / plain is ft_overhead's job in the quick run
    ("ft overhead", "ft_overhead.py", [], ["--full"]),
    # failover's TFS is under_faults' recovery latency; its restart baseline alone needs 45-95 s to come back here
    ("failover", "failover.py", None, []),
    ("under faults", "under_faults.py", [], ["--full"]),
    ("balance", "balance.py", None, []),
    # ten faults, each followed by the respawned worker's relaunch and rejoin: about 10 minutes here
    ("stream stall", "stream_stall.py", None, []),
]


def run_all(out: Path, full: bool, only: set[str] | None) -> dict[str, dict]:
    outcomes = {}
    for name, script, quick_args, full_args in BENCHMARKS:
        if (only and name.split()[0] not in only) or (quick_args is None and not full):
            continue
        out_flag = "--out-dir" if script == "scale_model.py" else "--out"
        cmd = [sys.executable, str(HERE / script), *(full_args if full else quick_args), out_flag, str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(cmd)
        outcomes[name] = {"exit": code, "seconds": round(time.monotonic() - started, 1)}
        print(f"== {name}: exit {code} after {outcomes[name]['seconds']} s", flush=True)
    return outcomes


def summary_rows(out: Path, since: float | None = None) -> list[tuple[str, str, str]]:
    """(measure, value, target) from the results in `out` (with `since`, a time.time(): only those written after
    it, so a result left from an earlier run never passes for this one's)."""

    def _load(out: Path, name: str) -> dict | None:
        path = out / name
        if not path.exists() or (since is not None and path.stat().st_mtime < since):
            return None
        return json.loads(path.read_text())

    rows = []
    if scale := _load(out, "scale_model.json"):
        ratios = [row["ratio"] for row in scale["rows"]]
        rows.append(("scale model: restart-and-reload / sglang-ft time until serving resumes, 8 GPUs losing 1-3",
                     f"{min(ratios):.1f}x .. {max(ratios):.1f}x", "projection"))
    if throughput := _load(out, "throughput.json"):
        by_key = {(r["tp"], r["ft"]): r for r in throughput["rows"] if "batch32_tok_s" in r}
        for tp in sorted({tp for tp, _ in by_key}):
            if (tp, True) in by_key and (tp, False) in by_key:
                ratio = by_key[(tp, True)]["batch32_tok_s"] / by_key[(tp, False)]["batch32_tok_s"]
                rows.append((f"throughput: --ft / plain, TP {tp}, batch 32", f"{ratio:.2f}", ">= 0.9"))
    if overhead := _load(out, "ft_overhead.json"):
        rows.append((f"ft overhead: --ft / plain tokens/s, TP {overhead['tp']}, no fault",
                     f"{overhead['ft_throughput_ratio']}", ">= 0.95"))
        rows.append(("ft overhead: --ft / plain p99 latency", f"{overhead['ft_p99_ratio']}", "-"))
    if failover := _load(out, "failover.json"):
        rows.append(("failover: TFS, restart-and-reload / sglang-ft", _times(failover["tfs_ratio"]), ">= 20x"))
        rows.append(("failover: TTP reduction", f"{failover['ttp_reduction']:.0%}"
                     if failover["ttp_reduction"] is not None else "n/a", ">= 70%"))
        rows.append(("failover: detection (ms)", f"{failover['detect_ms']}", "<= 2 heartbeats"))
        rows.append(("failover: requests lost by sglang-ft", f"{failover['lost_requests']}", "0"))
    if faults := _load(out, "under_faults.json"):
        ratios = faults["ratios"]
        throughput = "unbounded (restart-and-reload served no token in the window)" \
            if ratios.get("throughput_ratio_unbounded") else _times(ratios["throughput_ft_over_rr"])
        rows.append(("under faults: throughput, sglang-ft / restart-and-reload", throughput, ">= 2.5x"))
        rows.append(("under faults: recovery latency, restart-and-reload / sglang-ft",
                     _times(ratios["recovery_rr_over_ft"]), ">= 100x"))
        rows.append(("under faults: requests lost by sglang-ft", f"{ratios['ft_lost']}", "0"))
    if balance := _load(out, "balance.json"):
        for name, variant in balance.get("variants", {}).items():
            naive = name == "tp"  # contiguous heads: 3 + 3 + 2
            after = variant["after"]
            rows.append((f"balance: KV bytes max / min worker after 1 of 4 fails ({name})",
                         f"{after['kv_max_min_ratio']}", ">= 1.33 (naive)" if naive else "<= 1.05"))
            if "kv_blocks_apart_median" in after:
                rows.append((f"balance: KV bytes apart, fullest - emptiest worker, in blocks, median ({name})",
                             f"{after['kv_blocks_apart_median']}", "<= 1" if name == "cyclic" else "-"))
            rows.append((f"balance: busy time slowest / mean worker after the failure ({name})",
                         f"{after['busy_slowest_mean_ratio']}", "-" if naive else "<= 1.10"))
            rows.append((f"balance: prefix cache hit rate after the failure ({name})",
                         f"{after.get('prefix_hit_rate')}", "-"))
    if stall := _load(out, "stream_stall.json"):
        for kind, fault in (("kill", "SIGKILL"), ("stop", "SIGSTOP")):
            phase = stall["summary"][kind]
            if phase["faults"]:
                spread = phase["stall_ms"]
                rows.append((f"stream stall: a {fault} (TP {stall['tp']}) to every in-flight stream's next token, "
                             f"ms, median / max over {phase['faults']} faults",
                             f"{spread['median']} / {spread['max']}", f"<= {phase['target_ms']:.0f} (median)"))
        rows.append(("stream stall: requests lost or wrong", f"{stall['load']['lost'] + stall['load']['mismatched']}",
                     "0"))
    return rows


def _times(value) -> str:
    """A ratio, or why there is none (the baseline did not recover inside the measured window)."""
    return f"{value}x" if value is not None else "n/a (baseline not back within the window)"


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | this run | target |", "|---|---|---|"]
    lines += [f"| {measure} | {value} | {target} |" for measure, value, target in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark's --full form (much longer)")
    parser.add_argument("--only", nargs="+", choices=sorted({name.split()[0] for name, *_ in BENCHMARKS}),
                        help="run only these (first word of the name)")
    parser.add_argument("--out", type=Path, help="default: benchmark/results/quick, or benchmark/results with --full")
    args = parser.parse_args(argv)
    out = args.out or (HERE / "results" if args.full else HERE / "results" / "quick")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    outcomes = run_all(out, args.full, set(args.only) if args.only else None)
    print(f"\nsglang-ft benchmarks ({'full' if args.full else 'quick'} forms) of this run, results in {out}:\n")
    print(table(summary_rows(out, since=started)))
    failed = [name for name, outcome in outcomes.items() if outcome["exit"] != 0]
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see the output above)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
