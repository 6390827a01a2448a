"""The node's copy of the checkpoint in shared host memory (`--ft-weight-cache host`), so a regroup reads a lost
worker's slices from RAM rather than from disk.

One holder process per node (`spawn_holder`, started by the launcher) copies the checkpoint's `*.safetensors` into a
directory on tmpfs (/dev/shm: host RAM that every process of the node can map), writes `manifest.json` first and the
`complete` marker last, keeps the copy while the launcher lives and removes it when the launcher is gone. Each file
is written as `NAME.part` and renamed, so a file under its own name is whole. The copy is made only if the checkpoint
fits under the bound (`cache_bound`: a share of MemAvailable, the tmpfs' free space and `--ft-weight-cache-max-gb`);
otherwise the holder logs why and the cache is off. Copies left by holders that died (a SIGKILLed launcher) are
removed at start-up. Readers (python/sglang_ft/model_loader/weight_cache.py) take a cached file only under its own
name and at the checkpoint file's size, and read everything else from the checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

logger = logging.getLogger("sglang_ft.weight_cache")

SHM_ROOT = "/dev/shm"
PREFIX = "sglang-ft-weights-"
MEM_AVAILABLE_SHARE = 0.5  # at most half of the memory the node has free: the KV backup store and SGLang need RAM too
MANIFEST, COMPLETE = "manifest.json", "complete"


def checkpoint_files(checkpoint_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))


def _start_ticks(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat): with the pid, an identity a reused pid lacks.
    None once it has exited (a zombie included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def cache_dir_for(owner_pid: int, root: str = SHM_ROOT) -> str:
    """The copy of the deployment whose launcher is `owner_pid` (its start time in the name tells a reused pid)."""
    return os.path.join(root, f"{PREFIX}{owner_pid}-{_start_ticks(owner_pid)}")


def remove_stale(root: str = SHM_ROOT) -> list[str]:
    """Remove the copies whose owner process is gone; the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(root, PREFIX + "*")):
        pid, _, ticks = os.path.basename(path)[len(PREFIX):].partition("-")
        if not pid.isdigit() or _start_ticks(int(pid)) != ticks:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def cache_bound(root: str, max_bytes: int = 0, reserve_bytes: int = 0) -> tuple[int, str]:
    """The most bytes the copy may take, and what sets it: a share of MemAvailable less `reserve_bytes` (host
    memory the node's workers are about to take: their weights, on a machine without a GPU), the free space of the
    tmpfs, or `max_bytes` (`--ft-weight-cache-max-gb`; 0 for no limit of its own)."""
    fs = os.statvfs(root)
    share = f"{MEM_AVAILABLE_SHARE:.0%} of MemAvailable" + (" less the workers' weights" if reserve_bytes else "")
    limits = [(max(0, int(mem_available() * MEM_AVAILABLE_SHARE) - reserve_bytes), share),
              (fs.f_bavail * fs.f_frsize, f"free space of {root}")]
    if max_bytes > 0:
        limits.append((max_bytes, "--ft-weight-cache-max-gb"))
    return min(limits)


def _write_json(path: str, value: dict) -> None:
    with open(path + ".part", "w") as f:
        json.dump(value, f)
    os.replace(path + ".part", path)


def make_copy(checkpoint_dir: str, cache_dir: str, max_bytes: int = 0, reserve_bytes: int = 0) -> dict:
    """Copy the checkpoint's safetensors files into `cache_dir` if they fit under the bound; the manifest written.

    The manifest (`state` off, copying or complete) is what `cache_status` reports; `complete` is written last."""
    os.makedirs(cache_dir, exist_ok=True)
    files = {os.path.basename(path): os.path.getsize(path) for path in checkpoint_files(checkpoint_dir)}
    total = sum(files.values())
    bound, bound_by = cache_bound(os.path.dirname(cache_dir) or ".", max_bytes, reserve_bytes)
    manifest = {"checkpoint": os.path.abspath(checkpoint_dir), "files": files, "checkpoint_bytes": total,
                "bound_bytes": bound, "bound_by": bound_by, "state": "copying", "reason": ""}
    if not files:
        return _off(cache_dir, manifest, f"{checkpoint_dir} has no *.safetensors files")
    if total > bound:
        return _off(cache_dir, manifest, f"the checkpoint's {total / 2**30:.2f} GiB exceed the bound of "
                                         f"{bound / 2**30:.2f} GiB ({bound_by})")
    _write_json(os.path.join(cache_dir, MANIFEST), manifest)
    started = time.monotonic()
    try:
        for name in files:
            target = os.path.join(cache_dir, name)
            shutil.copyfile(os.path.join(checkpoint_dir, name), target + ".part")
            os.replace(target + ".part", target)
    except OSError as exc:  # the tmpfs filled up meanwhile (other users of /dev/shm), or the checkpoint went away
        for path in glob.glob(os.path.join(cache_dir, "*.safetensors*")):
            os.remove(path)
        return _off(cache_dir, manifest, f"copying failed: {exc}")
    manifest["state"] = "complete"
    _write_json(os.path.join(cache_dir, MANIFEST), manifest)
    with open(os.path.join(cache_dir, COMPLETE), "w") as f:
        f.write(f"{total}\n")
    logger.info("sglang-ft: weight cache: %d files, %.2f GiB copied to %s in %.1f s (bound %.2f GiB, %s)", len(files),
                total / 2**30, cache_dir, time.monotonic() - started, bound / 2**30, bound_by)
    return manifest


def _off(cache_dir: str, manifest: dict, reason: str) -> dict:
    manifest.update(state="off", reason=reason)
    logger.warning("sglang-ft: --ft-weight-cache host is off: %s; a lost worker's slices are read from disk", reason)
    _write_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest


def cache_status(cache_dir: str) -> dict:
    """What `/ft/status` reports of the copy: its state, the bytes it holds in host memory now, and its bound."""
    if not cache_dir:
        return {"state": "off", "bytes": 0}
    try:
        with open(os.path.join(cache_dir, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {"state": "starting", "dir": cache_dir, "bytes": 0}
    held = sum(os.path.getsize(p) for p in glob.glob(os.path.join(cache_dir, "*.safetensors*")) if os.path.isfile(p))
    state = "complete" if os.path.exists(os.path.join(cache_dir, COMPLETE)) else manifest.get("state", "copying")
    return {"state": state, "dir": cache_dir, "bytes": held, "checkpoint_bytes": manifest.get("checkpoint_bytes"),
            "bound_bytes": manifest.get("bound_bytes"), "bound_by": manifest.get("bound_by"),
            "reason": manifest.get("reason", "")}


def hold(checkpoint_dir: str, cache_dir: str, parent_pid: int, max_bytes: int = 0, reserve_bytes: int = 0,
         poll_s: float = 1.0) -> None:
    """The holder's life: clear dead owners' copies, make this one, keep it while `parent_pid` lives, remove it."""
    try:
        for path in remove_stale(os.path.dirname(cache_dir)):
            logger.info("sglang-ft: removed the weight cache of a dead owner, %s", path)
        os.nice(10)  # the copy yields the CPU and disk to the launch that runs meanwhile
        parent = _start_ticks(parent_pid)
        make_copy(checkpoint_dir, cache_dir, max_bytes, reserve_bytes)
        while parent is not None and _start_ticks(parent_pid) == parent:
            time.sleep(poll_s)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def spawn_holder(checkpoint_dir: str, cache_dir: str, parent_pid: int, max_bytes: int = 0,
                 reserve_bytes: int = 0) -> int:
    """Start the node's holder (it needs neither torch nor SGLang); its pid. It is detached (forked twice, a session
    of its own): SGLang's shutdown SIGKILLs every descendant of the launcher (`kill_process_tree`), and a killed
    holder would leave its copy in RAM until the next launch; detached, it sees the launcher gone and removes it."""
    starter = subprocess.run([sys.executable, "-m", "ft.weight_cache", "--checkpoint", checkpoint_dir,
                              "--dir", cache_dir, "--parent-pid", str(parent_pid), "--max-bytes", str(max_bytes),
                              "--reserve-bytes", str(reserve_bytes), "--detach"],
                             stdout=subprocess.PIPE, text=True, check=True, timeout=60)
    return int(starter.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, default=0)
    parser.add_argument("--reserve-bytes", type=int, default=0)
    parser.add_argument("--detach", action="store_true", help="print the holder's pid and leave it running apart")
    args = parser.parse_args(argv)
    if args.detach:
        holder = os.fork()
        if holder:
            print(holder, flush=True)
            os._exit(0)
        os.setsid()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(2, 1)  # off the starter's pipe (its reader waits for the pipe to close); onto the launcher's stderr
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s FT] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's Ctrl-C is the launcher's; its exit ends the hold
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server: remove the copy (`hold`'s finally)
    hold(args.checkpoint, args.dir, args.parent_pid, args.max_bytes, args.reserve_bytes)


if __name__ == "__main__":
    main()
