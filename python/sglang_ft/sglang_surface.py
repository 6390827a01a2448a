"""Every touch of an SGLang internal outside the hook table (hooks.py), by name: what sglang-ft does to SGLang's
scheduler, KV pool, process groups, DP controller and tokenizer manager when it regroups, and the SGLang names it
imports (`NAMES`, resolved lazily: `from sglang_ft.sglang_surface import Req`).

`PARAMETERS` pins the parameters of every SGLang callable used here or through `NAMES`, `ATTRIBUTES` the instance
attributes sglang-ft reads or sets on SGLang's objects, both as in SGLang 0.5.23: `tests/unit/test_sglang_surface.py`
checks them against the installed SGLang, so an upgrade that moves one fails with its name. Adapter modules (the
hooks' handlers), models and layers use SGLang as its own code does and are not listed here.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

logger = logging.getLogger(__name__)

# SGLang names imported by sglang-ft outside the adapters, models and layers.
NAMES = {
    "get_parallel": "sglang.srt.runtime_context.get_parallel",
    "get_device": "sglang.srt.runtime_context.get_device",
    "get_server_args": "sglang.srt.runtime_context.get_server_args",
    "get_exec": "sglang.srt.runtime_context.get_exec",
    "http_server_state": "sglang.srt.entrypoints.http_server._global_state",
    "ServerStatus": "sglang.srt.managers.tokenizer_manager.ServerStatus",
    "drop_elastic_cuda_graph_state": "sglang.srt.model_executor.model_runner_components.cuda_graph_setup."
                                     "drop_elastic_cuda_graph_state",
    "Req": "sglang.srt.managers.schedule_batch.Req",
    "TokenizedGenerateReqInput": "sglang.srt.managers.io_struct.TokenizedGenerateReqInput",
    "TokenizedEmbeddingReqInput": "sglang.srt.managers.io_struct.TokenizedEmbeddingReqInput",
    "ActiveRanksOutput": "sglang.srt.managers.io_struct.ActiveRanksOutput",
    "wrap_as_pickle": "sglang.srt.managers.io_struct.wrap_as_pickle",
    "RadixKey": "sglang.srt.mem_cache.radix_cache.RadixKey",
    "MatchPrefixParams": "sglang.srt.mem_cache.base_prefix_cache.MatchPrefixParams",
    "InsertParams": "sglang.srt.mem_cache.base_prefix_cache.InsertParams",
    "EvictParams": "sglang.srt.mem_cache.base_prefix_cache.EvictParams",
    "release_kv_cache": "sglang.srt.mem_cache.common.release_kv_cache",
    "broadcast_pyobj": "sglang.srt.utils.broadcast_pyobj",
    "set_default_torch_dtype": "sglang.srt.model_loader.utils.set_default_torch_dtype",
    "AuthLevel": "sglang.srt.utils.auth.AuthLevel",
    "auth_level": "sglang.srt.utils.auth.auth_level",
}

# The parameters of the SGLang callables sglang-ft calls (`inspect.signature`; bound classmethods without `cls`).
PARAMETERS = {
    "sglang.srt.managers.scheduler.run_scheduler_process": "server_args port_args gpu_id tp_rank pp_rank dp_rank "
                                                           "pipe_writer display_tp_rank display_dp_rank "
                                                           "display_moe_ep_rank",
    "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue": "self req is_retracted",
    "sglang.srt.managers.scheduler_components.ipc_channels.SchedulerIpcChannels.create": "port_args is_rank_zero "
                                                                                         "skip_tokenizer_init "
                                                                                         "metrics_enabled "
                                                                                         "enable_scripted_runtime",
    "sglang.srt.managers.load_snapshot.create_load_snapshot_writer": "port_args dp_size dp_rank publish_interval",
    "sglang.srt.managers.data_parallel_controller.DataParallelController._refresh_active_workers": "self",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler": "self obj",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers": "self",
    "sglang.srt.mem_cache.common.release_kv_cache": "req tree_cache checkpoint",
    "sglang.srt.model_executor.model_runner_components.cuda_graph_setup.drop_elastic_cuda_graph_state":
        "decode_runner eager_runner",
    "sglang.srt.managers.schedule_batch.Req.reset_for_retract": "self",
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row": "self kv ranges",
    "sglang.srt.mem_cache.base_prefix_cache.MatchPrefixParams": "key cow_mamba req",
    "sglang.srt.mem_cache.base_prefix_cache.InsertParams": "key value mamba_value mamba_keep_idx c128_value "
                                                           "prev_prefix_len swa_branching_seqlen inserted_len "
                                                           "priority session_id track_adopted_ranges rotation_base "
                                                           "component_evicted_seqlens",
    "sglang.srt.mem_cache.base_prefix_cache.EvictParams": "num_tokens swa_num_tokens mamba_num",
    "sglang.srt.runtime_context.ParallelContext.override_permanently": "self values",
    "sglang.srt.distributed.parallel_state.abort_distributed_environment": "",
    "sglang.srt.distributed.parallel_state.destroy_model_parallel": "",
    "sglang.srt.distributed.parallel_state.destroy_distributed_environment": "",
    "sglang.srt.distributed.bootstrap._init_parallel_groups": "backend dist_init_method server_args gpu_id",
    "sglang.srt.utils.broadcast_pyobj": "data rank dist_group src force_cpu_device",
    "sglang.srt.managers.io_struct.wrap_as_pickle": "obj",
    "sglang.srt.model_loader.utils.set_default_torch_dtype": "dtype",
    "sglang.srt.utils.auth.auth_level": "level",
    "sglang.srt.managers.scheduler.Scheduler.init_idle_sleeper": "self",
    "sglang.srt.managers.scheduler_components.idle_sleeper.IdleSleeper": "sockets can_empty_cache",
}

# Instance attributes sglang-ft reads or sets on SGLang's objects: each is assigned in its class's code (or is a
# dataclass field, a slot or a class attribute) in SGLang 0.5.23.
ATTRIBUTES = {
    "sglang.srt.managers.scheduler.Scheduler": "tp_group tp_cpu_group attn_tp_group attn_tp_cpu_group attn_cp_group "
                                               "attn_cp_cpu_group pp_group world_group tp_size tp_worker ipc_channels "
                                               "recv_from_tokenizer request_receiver load_snapshot_writer "
                                               "skip_tokenizer_init _engine_paused running_batch last_batch "
                                               "cur_batch_for_debug chunked_req max_queued_requests waiting_queue "
                                               "tree_cache token_to_kv_pool_allocator req_to_token_pool page_size "
                                               "new_token_ratio_tracker idle_sleeper",
    "sglang.srt.managers.tp_worker.TpModelWorker": "pp_group world_group model_runner",
    "sglang.srt.model_executor.model_runner.ModelRunner": "pp_group model device",
    "sglang.srt.managers.scheduler_components.ipc_channels.SchedulerIpcChannels": "send_to_tokenizer "
                                                                                  "send_to_detokenizer "
                                                                                  "recv_from_tokenizer recv_from_rpc",
    "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver": "recv_from_tokenizer "
                                                                                          "recv_from_rpc",
    "sglang.srt.managers.scheduler_components.output_sender.SenderWrapper": "socket",
    "sglang.srt.managers.schedule_batch.ScheduleBatch": "reqs batch_is_full",
    "sglang.srt.managers.schedule_batch.Req": "rid kv skip_radix_cache_insert",
    "sglang.srt.managers.schedule_batch.ReqKvInfo": "kv_committed_len kv_allocated_len cache_protected_len",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator": "size free_pages release_pages need_sort",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool": "head_num head_dim v_head_dim k_buffer v_buffer row_dim "
                                                         "v_row_dim",
    "sglang.srt.managers.data_parallel_controller.DataParallelController": "workers status",
    "sglang.srt.managers.tokenizer_manager.SignalHandler": "tokenizer_manager",
    "sglang.srt.utils.watchdog.SubprocessWatchdog": "_processes _names",
    "sglang.srt.runtime_context.ParallelContext": "_stamp",
    "sglang.srt.distributed.parallel_state": "_groups _MODEL_PARALLEL_GROUP_TIMEOUT",
    "sglang.srt.managers.scheduler_components.idle_sleeper.IdleSleeper": "poller",
}

# SGLang's IdleSleeper.maybe_sleep polls its sockets this long (`--sleep-on-idle`); test_sglang_surface times it.
IDLE_SLEEP_POLL_S = 1.0

# Handles of SGLang's process groups in `parallel_state` (those a version lacks are skipped).
_GROUP_HANDLES = ("_WORLD", "_TP", "_PP", "_ATTN_TP", "_ATTN_CP", "_DCP", "_MOE_EP", "_MOE_TP", "_MOE_DP",
                  "_SHARED_EXPERTS_TP", "_PDMUX_PREFILL_TP_GROUP")


def __getattr__(name: str):
    """`NAMES`, imported on first use: the launcher and the tokenizer manager import no scheduler code."""
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = NAMES[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


# Launch

def run_scheduler_process(run, *, server_args, port_args, gpu_id: int, tp_rank: int, pp_rank: int, dp_rank,
                          pipe_writer) -> None:
    """Run SGLang's scheduler process function `run` (the one its launcher was given), its arguments by name."""
    run(server_args=server_args, port_args=port_args, gpu_id=gpu_id, tp_rank=tp_rank, pp_rank=pp_rank,
        dp_rank=dp_rank, pipe_writer=pipe_writer)


# Process groups

def parallel_group_stamp() -> dict:
    """The ranks and widths SGLang's launcher stamped on this process's parallel context (plain values only:
    tearing the groups down clears the stamp)."""
    from sglang.srt.runtime_context import get_parallel

    stamp = get_parallel()._stamp
    return {k: v for k, v in stamp.items() if isinstance(v, (int, bool, str, type(None)))}


def tear_down_parallel_groups() -> None:
    """Abort and destroy SGLang's process groups, then forget their handles (a teardown that raised half-way
    leaves stale ones behind)."""
    from sglang.srt.distributed import parallel_state as ps

    ps.abort_distributed_environment()
    for teardown in (ps.destroy_model_parallel, ps.destroy_distributed_environment):
        try:
            teardown()
        except Exception as exc:  # groups already aborted: forget them
            logger.debug("sglang-ft: %s after abort: %s", teardown.__name__, exc)
    for handle in _GROUP_HANDLES:
        if hasattr(ps, handle):
            setattr(ps, handle, None)


def build_parallel_groups(backend: str, dist_init_method: str, timeout) -> None:
    """Build SGLang's process groups (TP, attention TP, PP, ...) on the default group just initialised, their
    collectives bounded by `timeout`."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.distributed.bootstrap import _init_parallel_groups
    from sglang.srt.runtime_context import get_device, get_server_args

    ps._MODEL_PARALLEL_GROUP_TIMEOUT = timeout
    _init_parallel_groups(backend=backend, dist_init_method=dist_init_method, server_args=get_server_args(),
                          gpu_id=get_device().gpu_id)


def group_coordinators() -> list:
    """SGLang's live group coordinators (each holding its pynccl communicator); none where SGLang is absent."""
    try:
        from sglang.srt.distributed import parallel_state as ps
    except ImportError:
        return []
    return [ref() for ref in list(ps._groups.values())]


# Scheduler

def point_scheduler_at_parallel_groups(scheduler) -> None:
    """The scheduler, its TP worker and model runner cache group handles at init; point them at the current ones."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    scheduler.tp_group = parallel.tp_group
    scheduler.tp_cpu_group = parallel.tp_group.cpu_group
    scheduler.attn_tp_group = parallel.attn_tp_group
    scheduler.attn_tp_cpu_group = parallel.attn_tp_group.cpu_group
    scheduler.attn_cp_group = parallel.attn_cp_group
    scheduler.attn_cp_cpu_group = parallel.attn_cp_group.cpu_group
    scheduler.pp_group = parallel.pp_group
    scheduler.world_group = parallel.world_group
    scheduler.tp_size = parallel.tp_size
    worker = scheduler.tp_worker
    worker.pp_group = parallel.pp_group
    worker.world_group = parallel.world_group
    worker.model_runner.pp_group = parallel.pp_group


def swap_scheduler_ipc_sockets(scheduler, port_args) -> None:
    """Open rank 0's sockets to the tokenizer manager and detokenizer in this scheduler and hand them to every
    component that holds the old ones."""
    from sglang.srt.managers.scheduler_components.ipc_channels import SchedulerIpcChannels

    fresh = SchedulerIpcChannels.create(
        port_args=port_args,
        is_rank_zero=True,
        skip_tokenizer_init=scheduler.skip_tokenizer_init,
        metrics_enabled=False,
        enable_scripted_runtime=False,
    )
    channels = scheduler.ipc_channels
    # Components captured the sender wrappers at init: give those wrappers the new sockets.
    channels.send_to_tokenizer.socket = fresh.send_to_tokenizer.socket
    channels.send_to_detokenizer.socket = fresh.send_to_detokenizer.socket
    scheduler.ipc_channels = dataclasses.replace(
        channels, recv_from_tokenizer=fresh.recv_from_tokenizer, recv_from_rpc=fresh.recv_from_rpc
    )
    scheduler.recv_from_tokenizer = fresh.recv_from_tokenizer
    scheduler.request_receiver = dataclasses.replace(
        scheduler.request_receiver, recv_from_tokenizer=fresh.recv_from_tokenizer, recv_from_rpc=fresh.recv_from_rpc
    )


def start_load_snapshot_writer(scheduler, port_args) -> None:
    """Give this scheduler SGLang's load snapshot writer (the one `/v1/loads` reads): SGLang gives one to the rank 0
    it started alone."""
    from sglang.srt.managers.load_snapshot import create_load_snapshot_writer
    from sglang.srt.runtime_context import get_observability, get_parallel

    parallel = get_parallel()
    scheduler.load_snapshot_writer = create_load_snapshot_writer(
        port_args, parallel.num_dp_ranks, parallel.dp_rank or 0,
        publish_interval=get_observability().load_snapshot_publish_interval,
    )


def set_engine_paused(scheduler, paused: bool) -> None:
    """SGLang's pause flag: while set, the caches may be flushed with requests queued."""
    scheduler._engine_paused = paused


def swap_model(model_runner, model) -> None:
    """The model the runner's forward calls from now on."""
    model_runner.model = model


def forget_running_batch(scheduler) -> None:
    """No batch runs or is half-prefilled any more: SGLang's next iteration schedules from the waiting queue."""
    scheduler.running_batch.reqs = []
    scheduler.running_batch.batch_is_full = False
    scheduler.last_batch = scheduler.cur_batch_for_debug = None
    scheduler.chunked_req = None


def requeue_retracted(scheduler, reqs) -> None:
    """Put `reqs` back in the waiting queue as retracted requests. Accepted work is never turned away:
    `--max-queued-requests` bounds what new clients may add, but SGLang's queue check would also abort a requeued
    request (as "queue full") when a flood filled the queue."""
    limit = getattr(scheduler, "max_queued_requests", None)
    scheduler.max_queued_requests = None
    try:
        for req in reqs:
            scheduler._add_request_to_queue(req, is_retracted=True)
    finally:
        scheduler.max_queued_requests = limit


def set_waiting_queue(scheduler, reqs: list) -> None:
    scheduler.waiting_queue = reqs


def set_free_slots(allocator, free_slots) -> None:
    """SGLang's token allocator hands out exactly `free_slots` (a 1-D int64 tensor on its device) from now on."""
    import torch

    allocator.free_pages = free_slots
    allocator.release_pages = torch.empty((0,), dtype=torch.int64, device=free_slots.device)


def sort_free_slots(allocator) -> None:
    """From now on the allocator hands out its free slots (pages) in ascending order, whatever order they were
    freed in: SGLang's own order where it sorts (`need_sort`: `merge_and_sort_free`). A host allocator's list is
    sorted by numpy's stable sort, a timsort: linear on the nearly sorted list parking leaves (an ascending run
    and the few slots given back at its tail), 0.2 ms for 65k slots where torch's sort takes 2."""
    import numpy as np
    import torch

    slots = torch.cat([allocator.free_pages, allocator.release_pages])
    ordered = torch.from_numpy(np.sort(slots.numpy(), kind="stable")) if slots.device.type == "cpu" else \
        slots.sort().values
    set_free_slots(allocator, ordered)


def set_new_token_ratio(scheduler, ratio: float) -> None:
    scheduler.new_token_ratio_tracker.current = ratio


# KV pool

def recreate_kv_buffers(pool, head_num: int) -> None:
    """Give SGLang's MHA KV pool `head_num` heads per layer: fresh buffers, the same slots."""
    pool.head_num = head_num
    pool.k_buffer = pool.v_buffer = None
    pool._create_buffers()
    pool.row_dim = pool.head_num * pool.head_dim
    pool.v_row_dim = pool.head_num * pool.v_head_dim


# Tokenizer manager and DP controller

def dispatch_to_scheduler(tokenizer_manager, obj) -> None:
    """Send `obj` to the schedulers as the tokenizer manager sends requests (through its hook: journaled)."""
    tokenizer_manager._dispatch_to_scheduler(obj)


def refresh_active_replicas(controller) -> None:
    """SGLang's DP controller recomputes which replicas it routes to and broadcasts to from its `status`."""
    controller._refresh_active_workers()


def restart_idle_sleeper(scheduler, rank_zero: bool) -> None:
    """Under `--sleep-on-idle` only TP rank 0 sleeps between requests, in a poll of its tokenizer sockets (the
    others wait for it in the request broadcast). SGLang decides that once, at start; after a regroup a new rank 0
    gets a sleeper on the sockets it took over, and any other rank none (a restarted worker started as the rank 0 of
    a group of one, with no sockets to poll)."""
    scheduler.idle_sleeper = None
    if rank_zero:
        scheduler.init_idle_sleeper()


def idle_poller(scheduler):
    """The zmq poller an idle rank 0 sleeps in, or None (not rank 0, or `--sleep-on-idle` off)."""
    sleeper = getattr(scheduler, "idle_sleeper", None)
    return None if sleeper is None else sleeper.poller
