"""Processes for the unit tests' emulated ranks (gloo, one process each), forked from one fork server that imported
torch and the code the ranks run once. Spawned, every rank imported them again: several seconds of CPU apiece, on
a 2-core machine where the unit tests already keep both cores busy. A fork server's children start from a process
with no threads, which gloo and OpenMP need; a fork of the test process itself (its threads, its torch state) is
not used. A test about what a fresh interpreter reads at start-up (an environment variable at import) still spawns.
"""

from __future__ import annotations

import multiprocessing

# Imported once by the fork server: torch, and the sglang-ft modules the rank functions import. The server starts
# with the first rank process of the session, with this list (later changes to it do not reach a running server).
PRELOAD = ["torch", "torch.distributed", "sglang_ft.distributed.standby_groups", "sglang_ft.elastic_tp.graph_refresh",
           "sglang_ft.distributed.collective_failure", "sglang_ft.managers.ft_worker", "sglang_ft.elastic_tp.reshard",
           "sglang_ft.model_loader.lazy_safetensors", "benchmark.reshard_schedule"]


def rank_context():
    """The multiprocessing context for rank processes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
