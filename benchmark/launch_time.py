"""Time to a healthy server on the torch_cpu platform: SGLang's children forked from the launcher vs spawned.

    python benchmark/launch_time.py [--tp 4] [--rounds 1] [--model-dir DIR]

Each round launches the same `--ft` server twice, alternating which goes first: once with the platform's default
(the launcher forks SGLang's schedulers and detokenizer, having imported SGLang itself) and once with
`SGLANG_FT_CPU_START_METHOD=spawn` (SGLang's own start method, each child importing SGLang again, as on GPUs).
Measured: seconds from `python -m sglang.launch_server` to the first 200 of `/health_generate`. What dominates the
ratio: the children's imports of SGLang (about 15 s of CPU each), which the fork skips. Writes
benchmark/results/launch_time_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmark/x.py`: import `benchmark.*` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sglang  # noqa: E402,F401  (SGLang first: the platform module below subclasses its CPU platform)
from sglang_ft.platforms.torch_cpu import START_METHOD_ENV  # noqa: E402
from sglang_ft.tools import make_tiny_model  # noqa: E402
from sglang_ft.tools.server_process import ServerProcess  # noqa: E402

METHODS = ("fork", "spawn")


def launch_seconds(model_dir: Path, tp: int, method: str) -> float:
    server = ServerProcess(str(model_dir), tp_size=tp, ft=True, extra_env={START_METHOD_ENV: method}).start()
    server.stop()
    return round(server.startup_s, 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sglang-ft-bench-tiny"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.rounds < 1:
        parser.error("--tp and --rounds must be positive")
    make_tiny_model.ensure_model(args.model_dir)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_ in range(args.rounds):
        for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:
            seconds[method].append(launch_seconds(args.model_dir, args.tp, method))
            print(f"[launch_time] round {round_ + 1}: {method} {seconds[method][-1]} s", flush=True)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": {"tp": args.tp, "rounds": args.rounds, "ft": True, "model": "tiny llama (make_tiny_model)"},
        "seconds_to_healthy": seconds,
        "median_s": median,
        "spawn_over_fork": round(median["spawn"] / median["fork"], 2),
        "dominated_by": "the spawned children's imports of SGLang (about 15 s of CPU each, all at once)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"launch_time_{report['date']}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"[launch_time] TP {args.tp}: fork {median['fork']} s, spawn {median['spawn']} s "
          f"({report['spawn_over_fork']}x); {path}")
    return report


if __name__ == "__main__":
    main()
