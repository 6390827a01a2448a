"""The reshard against its transfer schedule's prediction, on a model large enough for transfers to dominate.

    python -m benchmark.reshard_schedule [--hidden-size 1024] [--intermediate-size 4096] [--num-layers 5] [--reps 3]

A ~320 MB fp32 Llama from `make_tiny_model`; three gloo processes on this machine are the survivors of TP 4 after
worker 3 died (TP 4 -> 3): each loads its old TP 4 shard, then reshards by the planner's plan (slices from peers,
the dead worker's from the safetensors file). In the same run:

1. the links' bandwidths, each measured alone: a gloo send of the largest move's bytes between two of the processes
   (the others idle), and each disk reader's own slice reads (the reshard's `read_slices` from disk, nothing else running),
   plus a plain sequential read of the checkpoint file for context;
2. `schedule_transfers(plan, measured bandwidths)`: the predicted time (the busiest link's bytes over its bandwidth)
   and the sequential time (every move one after the other);
3. `--reps` reshards by the schedule and by the former all-at-once path (`reshard(..., scheduled=False)`),
   alternating which goes first; the group's time is from the barrier before it to the last rank's return, and the
   two paths' weights are compared bit for bit.

The checkpoint was just written, so its pages are in the page cache: "disk" here is a page-cache read. Each process
uses one torch thread (three processes share the cores). Writes
reshard_schedule_<date>.json and .md to `--out` (default benchmark/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import glob
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ft.partition import TPLayout
from ft.planner import Bandwidth, plan_migration, schedule_transfers

OLD_WORKERS, DEAD = (0, 1, 2, 3), 3
NEW_WORKERS = tuple(w for w in OLD_WORKERS if w != DEAD)
MB = 1e6


def planned(config):
    from ft.model_config import model_shape_of

    shape = model_shape_of(config)
    old_layout = TPLayout.even(shape, len(OLD_WORKERS))
    held = {w: old_layout.shard(r) for r, w in enumerate(OLD_WORKERS)}
    return old_layout, held, plan_migration(shape, held, list(NEW_WORKERS))


def join_as_survivor(rank: int, model_dir: str, init_file: str):
    """In a survivor process: join the gloo group of the three survivors and load this worker's old TP 4 shard.

    Returns (what each worker held, the plan, this worker, `build(layout, rank)` making an elastic model for a
    layout, the old model). Shared with tests/unit/test_reshard_schedule.py."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from sglang_ft.distributed_state import install_layout
    from sglang_ft.model_loader.lazy_safetensors import lazy_safetensors_iterator
    from sglang_ft.models import elastic_llama

    elastic_llama.LogitsProcessor = lambda *args, **kwargs: torch.nn.Identity()  # no weights; reads SGLang's context
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(NEW_WORKERS))
    config = AutoConfig.from_pretrained(model_dir)
    old_layout, held, plan = planned(config)
    me = NEW_WORKERS[rank]

    def build(layout, layout_rank):
        install_layout(layout, layout_rank)
        return elastic_llama.ElasticLlamaForCausalLM(config).eval()

    old = build(old_layout, OLD_WORKERS.index(me))
    old.load_weights(lazy_safetensors_iterator(sorted(glob.glob(f"{model_dir}/*.safetensors"))))
    return held, plan, me, build, old


def _survivor(rank: int, model_dir: str, reps: int, init_file: str, out: str, paced=None) -> None:
    """One survivor process: measure its links, then reshard `reps` times by each path; then, with `paced`
    ((bytes per second, shared dict, lock)), `reps` times each again on paced links (`benchmark/paced_links.py`)."""
    import torch
    import torch.distributed as dist

    from sglang_ft.elastic_tp.reshard import reshard
    from sglang_ft.model_loader.weight_cache import read_slices

    torch.set_num_threads(1)  # three processes on the machine's cores
    held, plan, me, build, old = join_as_survivor(rank, model_dir, init_file)
    result: dict = {"rank": rank, "worker": me, "p2p_s": [], "disk_s": None, "disk_bytes": 0,
                    "scheduled": [], "at_once": []}

    largest = max(m.nbytes for m in plan.moves if m.src is not None)  # the p2p probe: rank 1 -> rank 0
    probe = torch.ones(largest // 4, dtype=torch.float32)
    for _ in range(3):
        dist.barrier()
        start = time.monotonic()
        if rank == 0:
            dist.recv(probe, src=1)
            result["p2p_s"].append(time.monotonic() - start)
        elif rank == 1:
            dist.send(probe, dst=0)
    del probe

    mine = [m for m in plan.moves if m.src is None and m.dst == me]
    for reader in NEW_WORKERS:  # each disk reader alone, three times (the median)
        dist.barrier()
        if reader == me and mine:
            scratch = build(plan.layout, rank)
            for param in scratch.parameters():  # faulted in, as the reshard's target is: the reads alone timed
                param.data.zero_()
            pieces = [p for m in mine for p in scratch.unit_pieces(m.dim, m.start, m.end)]
            reads = []
            for _ in range(3):
                start = time.monotonic()
                read_slices(model_dir, pieces, cache_dir="")  # the checkpoint on disk, no host copy
                reads.append(time.monotonic() - start)
            result["disk_s"], result["disk_reads_s"] = statistics.median(reads), reads
            result["disk_bytes"] = sum(p.view.numel() * p.view.element_size() for p in pieces)
            del scratch, pieces

    def timed_reshards(before_each=lambda: None):
        """`reps` reshards by each path, alternating which goes first, each into a new model whose pages are
        faulted in first (the model's allocation, not the transfers); yields (rep, scheduled, the new model, its
        stats, (start, end, transfers_s))."""
        for rep in range(reps):
            for scheduled in (True, False) if rep % 2 == 0 else (False, True):
                before_each()
                new = build(plan.layout, rank)
                for param in new.parameters():
                    param.data.zero_()
                gc.collect()
                dist.barrier()
                start = time.monotonic()
                stats = reshard(old, new, plan, me, model_dir, held[me], scheduled=scheduled)
                yield rep, scheduled, new, stats, (start, time.monotonic(), stats.transfers_s)

    weights = {}
    for rep, scheduled, new, stats, times in timed_reshards():
        result["scheduled" if scheduled else "at_once"].append(times)
        result["bytes"] = {"kept": stats.bytes_kept, "p2p_in": stats.bytes_p2p_in, "disk": stats.bytes_reloaded}
        if rep == 0:
            weights[scheduled] = {n: p.detach() for n, p in new.named_parameters()}
        del new
    result["identical"] = all(torch.equal(v, weights[False][n]) for n, v in weights[True].items())
    if paced is not None:
        from benchmark.paced_links import PacedLinks

        links = PacedLinks(*paced, me=rank)
        links.install()
        result["paced_scheduled"], result["paced_at_once"] = [], []

        def next_round():  # a tag names one transfer within a round
            links.round += 1

        for _rep, scheduled, new, _stats, times in timed_reshards(next_round):
            result["paced_scheduled" if scheduled else "paced_at_once"].append(times)
            del new
    dist.barrier()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def sequential_read_gbps(model_dir: str) -> float:
    """A plain read of the checkpoint file(s) in 16 MB blocks (from the page cache here)."""
    total, start = 0, time.monotonic()
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        with open(path, "rb", buffering=0) as f:
            while block := f.read(16 << 20):
                total += len(block)
    return total / (time.monotonic() - start) / 1e9


def median(times) -> float:
    return round(statistics.median(times), 4)


def listed(times) -> list[float]:
    return [round(t, 4) for t in times]


def group_times(results: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Per rep: the whole reshard, from the earliest rank's start to the last rank's end (the ranks share one
    monotonic clock), and the slowest rank's transfers (what the schedule predicts: no kept-slice copies)."""
    reps = range(len(results[0][key]))
    return ([max(r[key][i][1] for r in results) - min(r[key][i][0] for r in results) for i in reps],
            [max(r[key][i][2] for r in results) for i in reps])


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from sglang_ft.tools import make_tiny_model

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="sglang-ft-reshard-"))
    model_dir = str(tmp / "model")
    make_tiny_model.main([model_dir, "--hidden-size", str(args.hidden_size), "--intermediate-size",
                          str(args.intermediate_size), "--num-layers", str(args.num_layers), "--seed", "5"])
    file_bytes = sum(os.path.getsize(p) for p in glob.glob(f"{model_dir}/*.safetensors"))
    sequential = sequential_read_gbps(model_dir)
    _, _, plan = planned(AutoConfig.from_pretrained(model_dir))
    context = multiprocessing.get_context("spawn")
    manager = context.Manager() if args.paced_link_gbps else None
    paced = (args.paced_link_gbps * 1e9, manager.dict(), manager.Lock()) if manager else None
    outs = [str(tmp / f"rank{r}.json") for r in range(len(NEW_WORKERS))]
    ranks = [context.Process(target=_survivor, args=(r, model_dir, args.reps, str(tmp / "init"), outs[r], paced))
             for r in range(len(NEW_WORKERS))]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=1800)
    if any(p.exitcode != 0 for p in ranks):
        raise SystemExit(f"a survivor process failed: exit codes {[p.exitcode for p in ranks]}")
    results = [json.loads(Path(o).read_text()) for o in outs]
    shutil.rmtree(tmp, ignore_errors=True)
    if manager is not None:
        manager.shutdown()

    p2p_bytes = max(m.nbytes for m in plan.moves if m.src is not None)
    p2p_bps = p2p_bytes / statistics.median(results[0]["p2p_s"])
    readers = [r for r in results if r["disk_s"]]
    disk_bps = min(r["disk_bytes"] / r["disk_s"] for r in readers)
    schedule = schedule_transfers(plan, Bandwidth(p2p=p2p_bps, disk=disk_bps))
    links = {f"p2p into {w}": sum(m.nbytes for m in q) for w, q in schedule.p2p_queues.items()}
    for src in {m.src for q in schedule.p2p_queues.values() for m in q}:
        links[f"p2p out of {src}"] = sum(m.nbytes for q in schedule.p2p_queues.values() for m in q if m.src == src)
    links.update({f"disk of {w}": sum(m.nbytes for m in q) for w, q in schedule.disk_queues.items()})
    (scheduled, scheduled_transfers), (at_once, at_once_transfers) = (group_times(results, "scheduled"),
                                                                      group_times(results, "at_once"))
    report = {
        "date": dt.date.today().isoformat(),
        "command": "python -m benchmark.reshard_schedule " + " ".join(args.argv),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "load_average_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)]},
        "model": {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                  "num_layers": args.num_layers, "dtype": "float32", "checkpoint_mb": round(file_bytes / MB, 1)},
        "group": f"TP {len(OLD_WORKERS)} -> {len(NEW_WORKERS)} (worker {DEAD} died), gloo processes on one machine",
        "plan_mb": {"kept": round(plan.bytes_kept / MB, 1), "p2p": round(plan.bytes_p2p / MB, 1),
                    "reloaded": round(plan.bytes_reloaded / MB, 1)},
        "links_mb": {k: round(v / MB, 1) for k, v in sorted(links.items())},
        "bandwidth_gbps": {"gloo_p2p_alone": round(p2p_bps / 1e9, 3), "slice_reads_alone": round(disk_bps / 1e9, 3),
                           "sequential_file_read": round(sequential, 3), "p2p_probe_mb": round(p2p_bytes / MB, 1)},
        "predicted_s": round(schedule.estimated_s, 4),
        "sequential_s": round(schedule.sequential_s, 4),
        "scheduled_s": listed(scheduled),
        "at_once_s": listed(at_once),
        "scheduled_transfers_s": listed(scheduled_transfers),
        "at_once_transfers_s": listed(at_once_transfers),
        "scheduled_median_s": median(scheduled),
        "at_once_median_s": median(at_once),
        "scheduled_transfers_median_s": median(scheduled_transfers),
        "at_once_transfers_median_s": median(at_once_transfers),
        "measured_over_predicted": round(median(scheduled) / schedule.estimated_s, 2),
        "transfers_over_predicted": round(median(scheduled_transfers) / schedule.estimated_s, 2),
        "bit_identical_paths": all(r["identical"] for r in results),
        "bytes_per_rank": {r["worker"]: r["bytes"] for r in results},
    }
    if args.paced_link_gbps:
        report["paced"] = paced_report(plan, results, args.paced_link_gbps)
    return report


def paced_report(plan, results: list[dict], gbps: float) -> dict:
    """The reshards on paced links against the schedule's prediction at the links' bandwidth."""
    schedule = schedule_transfers(plan, Bandwidth(p2p=gbps * 1e9, disk=gbps * 1e9))
    (scheduled, _), (at_once, _) = group_times(results, "paced_scheduled"), group_times(results, "paced_at_once")
    return {"link_gbps": gbps, "predicted_s": round(schedule.estimated_s, 4),
            "sequential_s": round(schedule.sequential_s, 4),
            "scheduled_s": listed(scheduled), "at_once_s": listed(at_once),
            "scheduled_median_s": median(scheduled), "at_once_median_s": median(at_once),
            "scheduled_over_predicted": round(median(scheduled) / schedule.estimated_s, 2),
            "at_once_over_predicted": round(median(at_once) / schedule.estimated_s, 2)}


def markdown(report: dict) -> str:
    bw = report["bandwidth_gbps"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in report["links_mb"].items())
    return f"""# Reshard by the transfer schedule vs its prediction ({report['date']})

`{report['command']}`: {report['group']}; a {report['model']['checkpoint_mb']} MB fp32 Llama from make_tiny_model
(hidden {report['model']['hidden_size']}, MLP {report['model']['intermediate_size']}, {report['model']['num_layers']}
layers). Machine: {report['host']['cpus']} cores, 1-minute load average {report['host']['load_average_1m_before_after']}
(before, after: other sessions' work shares the cores). Plan: kept {report['plan_mb']['kept']} MB, peer to peer {report['plan_mb']['p2p']} MB, from the checkpoint
{report['plan_mb']['reloaded']} MB.

| link | MB |
|---|---|
{rows}

Bandwidths measured in this run, each link alone: gloo send {bw['gloo_p2p_alone']} GB/s ({bw['p2p_probe_mb']} MB),
slice reads {bw['slice_reads_alone']} GB/s (the reshard's own reader; medians of 3), plain sequential file read
{bw['sequential_file_read']} GB/s (page cache).

| | seconds |
|---|---|
| schedule's prediction (busiest link) | {report['predicted_s']} |
| every move in sequence (the schedule's comparison) | {report['sequential_s']} |
| reshard by the schedule, whole, median of {len(report['scheduled_s'])} | {report['scheduled_median_s']} ({report['scheduled_s']}) |
| former all-at-once reshard, whole, median | {report['at_once_median_s']} ({report['at_once_s']}) |
| by the schedule, transfers and the overlapped kept-slice copies (slowest rank), median | {report['scheduled_transfers_median_s']} ({report['scheduled_transfers_s']}) |
| all at once, transfers only (slowest rank; it copies the kept slices before), median | {report['at_once_transfers_median_s']} ({report['at_once_transfers_s']}) |

Fastest of the {len(report['scheduled_s'])} (the least disturbed by other work): by the schedule
{min(report['scheduled_s'])} s whole, {min(report['scheduled_transfers_s'])} s transfers; all at once
{min(report['at_once_s'])} s whole, {min(report['at_once_transfers_s'])} s transfers.

Measured (median) / predicted: {report['measured_over_predicted']}x for the whole reshard,
{report['transfers_over_predicted']}x for its transfers (with the kept slices' copies, which the schedule does not count: the
scheduled path makes them while its peer moves are on the wire; the whole adds the replicated tensors and the
group's barrier). Both paths' weights
bit-identical: {report['bit_identical_paths']}. The new model's pages are faulted in before each timing (its
allocation's cost, not the transfers').

{report['dominates']}
{paced_markdown(report.get("paced"))}"""


def paced_markdown(paced: dict | None) -> str:
    if not paced:
        return ""
    return f"""
## The same reshards on paced links (`benchmark/paced_links.py`)

Every link paced to {paced['link_gbps']} GB/s on one clock the three processes share, independent of each other (a
worker's inbound and outbound peer traffic, its checkpoint reads), while every transfer, read and copy still runs
for real: the links, not the two cores, decide the time, as on a GPU host. It measures the executor (does it keep
every link busy in the schedule's order?), not the hardware.

| | seconds |
|---|---|
| schedule's prediction at {paced['link_gbps']} GB/s (busiest link) | {paced['predicted_s']} |
| every move in sequence | {paced['sequential_s']} |
| reshard by the schedule, whole, median | {paced['scheduled_median_s']} ({paced['scheduled_s']}) |
| former all-at-once reshard, whole, median | {paced['at_once_median_s']} ({paced['at_once_s']}) |

Measured (median) / predicted: {paced['scheduled_over_predicted']}x by the schedule, {paced['at_once_over_predicted']}x all at once.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=4096)
    parser.add_argument("--num-layers", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--paced-link-gbps", type=float, default=0.2,
                        help="then reshard again on links paced to this bandwidth each, independent of each other "
                             "(benchmark/paced_links.py); 0: skip")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.paced_link_gbps < 0:
        parser.error("--paced-link-gbps must be 0 (skip) or more")
    args.argv = list(argv or [])
    return args


DOMINATES = ("What dominates here (2 cores shared by three survivor processes, and by other work where the load "
             "average before and after says so): every byte is a CPU memory copy. Gloo copies each peer byte "
             "through loopback TCP (kernel copies on both ends), the slice reads copy from the page cache (strided "
             "for column slices: 0.5-2 GB/s against 7-9 GB/s for a sequential read of the same file), and the kept "
             "slices' copies (not in the prediction) share the cores with both. The schedule's links are independent in its "
             "model but share the two cores here, and the other sessions' load makes single reshards vary several "
             "fold (medians and fastest both shown); the link bandwidths, measured alone under the same load, vary "
             "too, so the prediction is as noisy as the measurement.")


def main(argv: list[str] | None = None) -> dict:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(args)
    report["dominates"] = DOMINATES
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"reshard_schedule_{report['date']}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(json.dumps({k: report.get(k) for k in ("predicted_s", "scheduled_median_s", "at_once_median_s",
                                                 "measured_over_predicted", "bandwidth_gbps", "bit_identical_paths",
                                                 "paced")}))
    return report


if __name__ == "__main__":
    main()
