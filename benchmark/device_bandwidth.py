"""Measure, on one GPU, the transfer rates the scale model (benchmark/scale_model.py) needs, with torch alone.

    python benchmark/device_bandwidth.py [--out benchmark/results/device_bandwidth.json] [--quick]

What a recovery moves and what a restart reloads, each timed on the device as it is (median of repeats, CUDA
events or a synchronized host clock):

- host <-> device copies, pageable and pinned (a backup store restore lands from host memory; a reload goes
  through host memory);
- a device-local copy (reading plus writing; the ceiling for any on-device KV reshape);
- KV rows: gather the rows of random token slots of one KV head over every layer (what a regroup sends for a
  moved head), device -> pinned host (what backup streaming costs), host -> device scatter (a restore);
- checkpoint reads: a safetensors file read from the page cache and cold (the file's pages dropped with
  posix_fadvise, no privilege needed), to host and straight to the device;
- CUDA context start-up of a fresh process (part of any restart).

Peer-to-peer between GPUs (NVLink) needs two GPUs; one is lent here, so the scale model cites NVIDIA's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

GIB = 1 << 30


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` (device work synchronized before and after each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copies(nbytes: int, repeats: int) -> dict:
    n = nbytes // 2
    device = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    other = torch.empty_like(device)
    pageable = torch.randn(n).to(torch.bfloat16)
    pinned = torch.empty(n, dtype=torch.bfloat16).pin_memory()
    pinned.copy_(pageable)
    rates = {
        "h2d_pageable": nbytes / timed(lambda: device.copy_(pageable), repeats),
        "h2d_pinned": nbytes / timed(lambda: device.copy_(pinned, non_blocking=True), repeats),
        "d2h_pageable": nbytes / timed(lambda: pageable.copy_(device), repeats),
        "d2h_pinned": nbytes / timed(lambda: pinned.copy_(device, non_blocking=True), repeats),
        # read + write, as the device-to-device figures on datasheets count it
        "d2d_local_read_plus_write": 2 * nbytes / timed(lambda: other.copy_(device), repeats),
    }
    assert torch.equal(other, device) and torch.equal(pinned.cuda(), device)
    return {k: round(v / 1e9, 2) for k, v in rates.items()}


def kv_rows(layers: int, slots: int, heads: int, head_dim: int, moved: int, repeats: int) -> dict:
    """One rank's KV pool [layers][slots, heads, head_dim] (K and V); move `moved` random slots of one head."""
    k = [torch.randn(slots, heads, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    v = [torch.randn_like(x) for x in k]
    index = torch.randperm(slots, device="cuda")[:moved].sort().values
    nbytes = 2 * layers * moved * head_dim * 2  # K and V, bf16, one head

    def gather():
        return torch.stack([torch.stack([x[index, 0] for x in k]), torch.stack([x[index, 0] for x in v])])

    rows = gather()
    pinned = torch.empty(rows.shape, dtype=rows.dtype).pin_memory()
    pageable = torch.empty(rows.shape, dtype=rows.dtype)

    def scatter_from(host):
        staged = host.to("cuda", non_blocking=True)
        for layer in range(layers):
            k[layer][index, 1] = staged[0, layer]
            v[layer][index, 1] = staged[1, layer]

    result = {
        "gather_on_device": nbytes / timed(gather, repeats),
        "gather_to_pinned_host": nbytes / timed(lambda: pinned.copy_(gather(), non_blocking=True), repeats),
        "gather_to_pageable_host": nbytes / timed(lambda: pageable.copy_(gather()), repeats),
        "scatter_from_pinned_host": nbytes / timed(lambda: scatter_from(pinned), repeats),
        "scatter_from_pageable_host": nbytes / timed(lambda: scatter_from(pageable), repeats),
    }
    pinned.copy_(gather())
    scatter_from(pinned)
    assert all(torch.equal(x[index, 1], x[index, 0]) for x in k + v), "KV rows did not land where they belong"
    out = {key: round(val / 1e9, 2) for key, val in result.items()}
    out["shape"] = {"layers": layers, "slots": slots, "heads": heads, "head_dim": head_dim, "moved_slots": moved,
                    "bytes_moved": nbytes}
    return out


def checkpoint_reads(nbytes: int, directory: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {f"w{i}": torch.randn(nbytes // 16 // 2, dtype=torch.bfloat16) for i in range(16)}
    path = os.path.join(directory, "bench.safetensors")
    save_file(tensors, path)
    size = os.path.getsize(path)
    expected = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors

    def drop_pages():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def read_safetensors(device: str) -> list:
        with safe_open(path, framework="pt", device=device) as f:
            # on the host safetensors maps the file lazily: clone so every page is really read
            return [f.get_tensor(name) if device != "cpu" else f.get_tensor(name).clone() for name in f.keys()]

    staged = torch.empty(size, dtype=torch.uint8).pin_memory()  # allocated once, as a loader's staging buffer

    def read_into_pinned_then_device() -> list:
        """What a fast loader does: read the file into pinned host memory in large chunks, copy to the device."""
        view, offset = memoryview(staged.numpy()), 0
        with open(path, "rb", buffering=0) as f:
            while offset < size:
                offset += f.readinto(view[offset : offset + (64 << 20)])
        return [staged.to("cuda", non_blocking=True)]

    def seconds(load, cold: bool) -> float:
        if cold:
            drop_pages()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loaded = load()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        assert sum(t.numel() * t.element_size() for t in loaded) >= expected, "not every tensor was read"
        return elapsed

    ways = {
        "to_host": lambda: read_safetensors("cpu"),
        "to_device": lambda: read_safetensors("cuda:0"),
        "to_pinned_then_device": read_into_pinned_then_device,
    }
    seconds(ways["to_host"], cold=False)  # warm the page cache once
    result = {}
    for name, load in ways.items():
        result[f"page_cache_{name}"] = size / statistics.median(seconds(load, False) for _ in range(3))
        result[f"cold_{name}"] = size / statistics.median(seconds(load, True) for _ in range(3))
    os.remove(path)
    out = {k: round(v / 1e9, 2) for k, v in result.items()}
    out["file_bytes"] = size
    return out


def cuda_process_start() -> dict:
    """Wall time of a fresh Python process importing torch and creating a CUDA context (part of any restart)."""
    code = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return {"python_import_torch_cuda_context_s": round(statistics.median(times), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "device_bandwidth.json"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--checkpoint-dir", default=tempfile.gettempdir())
    parser.add_argument("--parts", default="copies,kv_rows,checkpoint_reads,process_start",
                        help="comma-separated subset of the measurements")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("device_bandwidth.py needs a CUDA device")
    repeats = 5 if args.quick else 20
    props = torch.cuda.get_device_properties(0)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": props.name,
        "device_memory_gib": round(props.total_memory / GIB, 1),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__},
        "units": "GB/s (1e9 bytes per second) unless named otherwise",
    }
    parts = {
        "copies": lambda: copies(GIB // (4 if args.quick else 1), repeats),
        # Llama-3-8B-like: 32 layers, head_dim 128, 256k slots; move 64k slots of one KV head (head 0 -> head 1)
        "kv_rows": lambda: kv_rows(32, 1 << 18, 2, 128, 1 << 16, repeats),
        "checkpoint_reads": lambda: checkpoint_reads(GIB if args.quick else 4 * GIB, args.checkpoint_dir),
        "process_start": cuda_process_start,
    }
    for name in args.parts.split(","):
        result[name] = parts[name]()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
