"""The `torch_cpu` platform: unmodified SGLang serving on a machine with no GPU, with torch-native ops and gloo.

SGLang's in-tree CPU platform needs a CPU build of sgl_kernel (not on PyPI) or vllm. This out-of-tree platform
subclasses it, so SGLang takes its generic (torch-native) code paths: the `torch_native` attention backend,
native RMSNorm / RoPE / activation kernels, gloo for tensor parallelism. It also picks each TP rank's cores and
gives the rank's torch that many threads, so no SGLANG_* variable is needed. It activates only where no CUDA
device exists.
"""

from __future__ import annotations

import gc
import logging
import os

import psutil
from sglang.srt.platforms.cpu import CpuSRTPlatform
from sglang.srt.platforms.device_mixin import PlatformEnum

logger = logging.getLogger(__name__)

OMP_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
START_METHOD_ENV = "SGLANG_FT_CPU_START_METHOD"
START_METHODS = ("fork", "spawn")


def thread_binding(num_ranks: int, cpu_ids: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND value giving each rank its own cores, or sharing them round robin.

    With at least as many cores as ranks, each rank gets a contiguous block; with fewer, rank r gets core
    r % num_cores (e.g. `0|1|0|1` for TP 4 on 2 cores).
    """
    if num_ranks <= 0:
        raise ValueError("num_ranks must be positive")
    cpu_ids = sorted(cpu_ids) or [0]
    if num_ranks > len(cpu_ids):
        return "|".join(str(cpu_ids[r % len(cpu_ids)]) for r in range(num_ranks))
    per_rank = len(cpu_ids) // num_ranks
    groups = [cpu_ids[r * per_rank : (r + 1) * per_rank] for r in range(num_ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def cpu_ids_of(spec: str) -> list[int]:
    """One rank's SGLANG_CPU_OMP_THREADS_BIND entry as core ids: `0-3,8` -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise ValueError(f"{OMP_BIND_ENV}: {spec!r} is not a list of cores such as 0-3,8")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def use_rank_cores(local_omp_cpuid: str | None) -> int:
    """Give this rank's torch one intra-op thread per core its SGLANG_CPU_OMP_THREADS_BIND entry names; returns
    the count.

    SGLang applies the entry only through sgl_kernel's CPU ops (AMX or arm64 builds), which this platform runs
    without: each rank's torch kept one OpenMP thread per core of the machine, so N ranks on C cores ran N * C
    threads that spin between ops on C cores. Measured on 2 cores, TP 4 (two ranks per core), 6 streaming clients:
    a decode step 257 ms median with the machine's thread count, 53 ms with one thread per rank. The process is
    not pinned: the rank's other threads (heartbeats, KV backup) keep the kernel's free choice of core."""
    import torch

    threads = len(cpu_ids_of(local_omp_cpuid)) if local_omp_cpuid else os.cpu_count() or 1
    torch.set_num_threads(threads)
    logger.info("torch_cpu: %d torch thread(s) for this rank (cores %s)", threads, local_omp_cpuid or "all")
    return threads


def cpu_start_method() -> str:
    """How a CPU launcher starts SGLang's children: `fork` unless SGLANG_FT_CPU_START_METHOD says `spawn`.

    SGLang spawns its schedulers, detokenizer and DP controller, and each spawned child imports SGLang again: a
    scheduler's import is about 15 s of CPU, and on a small machine four of them at once were most of a TP 4
    launch (62.0 s; 18.5 s forked from the launcher, which has imported it all already:
    benchmark/results/launch_time_2026-12-03.json). GPU launches keep SGLang's
    `spawn` (CUDA cannot be used across a fork); `spawn` here runs the children exactly as a GPU launch does.
    """
    method = os.environ.get(START_METHOD_ENV, "fork")
    if method not in START_METHODS:
        raise ValueError(f"{START_METHOD_ENV}={method!r}: use one of {', '.join(START_METHODS)}")
    return method


def children_start_method() -> str:
    """The start method for SGLang's children in this process: the torch_cpu platform's, else SGLang's `spawn`."""
    from sglang.srt.platforms import current_platform

    return cpu_start_method() if isinstance(current_platform, TorchCpuPlatform) else "spawn"


KV_MEMORY_FRACTION = 0.2  # of the machine's available RAM, shared by every rank's KV pool
MAX_DEFAULT_TOKENS = 1 << 16


def default_max_total_tokens(model_path: str, dtype: str) -> int | None:
    """A KV pool that fits in a fifth of free RAM (at most 2^16 tokens).

    Every CPU rank measures the same machine-wide free memory, so SGLang's per-device sizing would let each rank
    claim most of it; a token budget keeps TP > 1 from running the machine out of memory. 2^16 tokens is 32 full
    2048-token contexts, more than a CPU serves at once; a larger pool only costs time: SGLang zeroes it at start,
    and a regroup that widens a rank's heads allocates (and zeroes) it again, at CPU memory bandwidth.
    """
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except Exception:  # not a Llama-like config: leave sizing to SGLang
        return None
    itemsize = 2 if dtype in ("float16", "bfloat16", "half") else 4
    bytes_per_token = 2 * layers * kv_heads * head_dim * itemsize
    budget = int(psutil.virtual_memory().available * KV_MEMORY_FRACTION)
    return max(1024, min(MAX_DEFAULT_TOKENS, budget // bytes_per_token))


class TorchCpuPlatform(CpuSRTPlatform):
    """SGLang's CPU platform marked out-of-tree, so SGLang uses torch-native paths instead of sgl_kernel CPU ops."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def get_device(self, device_id: int = 0) -> str:
        """"cpu" as a string: SGLang's `get_device()` feeds this to the `--device` default, which must be a str."""
        return "cpu"

    def init_backend(self) -> None:
        """Nothing to initialise: torch's CPU ops are always there."""

    def empty_cache(self) -> None:
        """Collect only the young generations. SGLang's CPU platform runs a full `gc.collect()` here (at
        `/flush_cache` and idle sleeps): with SGLang imported that walks ~10^6 objects holding the GIL (1.2-1.5 s
        measured on 2 loaded cores), silencing an `--ft` worker's heartbeat thread past the 1 s timeout, so a cache
        flush got a healthy worker declared dead. Torch's CPU tensors are freed by reference counting anyway."""
        gc.collect(1)

    def apply_server_args_defaults(self, server_args) -> None:
        """CPU defaults: float32, torch-native attention, no graphs, idle schedulers asleep, a KV budget, per-rank
        cores for the user."""
        server_args.device = "cpu"
        if server_args.dtype == "auto":
            server_args.dtype = "float32"  # CPUs without AMX run float32 fastest, and it matches transformers
        if server_args.attention_backend is None:
            server_args.attention_backend = "torch_native"
        server_args.disable_cuda_graph = True
        # Idle schedulers spin in their event loop; on a CPU the ranks share the cores that compute (an idle TP 4
        # server here kept 1.53 of 2 cores busy, 0.22 with this). Rank 0 sleeps in a poll of its sockets instead,
        # the other ranks wait for it in the request broadcast (under --ft, where its timeout allows).
        from sglang_ft.server_args import ft_args, idle_sleep_fits

        ft = ft_args()
        if not ft.enabled or idle_sleep_fits(ft.collective_timeout_s):
            server_args.sleep_on_idle = True
        if server_args.max_total_tokens is None:
            server_args.max_total_tokens = default_max_total_tokens(server_args.model_path, server_args.dtype)
        if not os.environ.get(OMP_BIND_ENV):
            world = server_args.tp_size * server_args.pp_size * server_args.dp_size
            os.environ[OMP_BIND_ENV] = thread_binding(world, sorted(os.sched_getaffinity(0)))
            logger.info("torch_cpu: %s=%s", OMP_BIND_ENV, os.environ[OMP_BIND_ENV])
