"""Every hook sglang-ft puts on SGLang, in one table: target -> (hook type, handler).

This is the plugin's whole surface on SGLang 0.5.23; `tests/unit/test_hooks.py` resolves every target so an SGLang
upgrade that moves one fails loudly. Each handler leaves SGLang's behaviour untouched unless `--ft` is on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

from sglang.srt.plugins.hook_registry import HookType

from sglang_ft.distributed.collective_failure import CollectiveFailure
from sglang_ft.entrypoints.ft_events import around_is_ready
from sglang_ft.launch_checks import ELASTIC_ARCHITECTURES, check_ft_launch
from sglang_ft.elastic_tp import graph_refresh
from sglang_ft.server_args import (
    FT_DEFAULT_MAX_QUEUED_REQUESTS,
    FtArgs,
    across_nodes,
    add_ft_cli_args,
    cli_error,
    ft_args,
    ft_enabled,
    publish,
)

logger = logging.getLogger(__name__)


def after_add_cli_args(_result, parser, *_args, **_kwargs):
    """List the `--ft` flags in SGLang's own parser (`--help` included)."""
    add_ft_cli_args(parser)


def around_from_cli_args(original, cls, args, *rest, **kwargs):
    """Carry the FT options to the subprocesses and refuse a bad `--ft` launch before anything starts."""
    ft = FtArgs.from_namespace(args)
    publish(ft)
    server_args = original(cls, args, *rest, **kwargs)
    if ft.enabled:
        problems = check_ft_launch(server_args)
        if not problems:
            ft = dataclasses.replace(across_nodes(ft, server_args), dp_size=server_args.dp_size or 1)
            publish(ft)
        problems = ft.problems() + problems
        if problems:
            cli_error("; ".join(problems))
        # Recovery re-enters SGLang's plain loop; overlap scheduling buys nothing without an accelerator stream.
        server_args.disable_overlap_schedule = True
        # SGLang's custom all-reduce spins on flags in a peer's memory and has no abort: a survivor would spin for
        # ever on a dead peer. NCCL (pynccl) is aborted by the interrupt (group_interrupt.py).
        server_args.disable_custom_all_reduce = True
        if ft.splits_remainder:  # which rows a worker computes changes with every batch's placement
            server_args.disable_cuda_graph = True
        if server_args.max_queued_requests is None:  # a flood gets 503 + Retry-After, not unbounded memory
            server_args.max_queued_requests = FT_DEFAULT_MAX_QUEUED_REQUESTS
    return server_args


def before_launch_server(server_args, *args, **kwargs):
    """Under `--ft`, start the FT controller and add the `/ft/*` routes before SGLang spawns its schedulers."""
    if ft_enabled():
        from sglang.srt.entrypoints import http_server

        from sglang_ft.entrypoints.ft_runtime import join_ft_runtime, start_ft_runtime

        if ft_args().node_rank > 0:  # the controller runs on node 0; this node's workers reach it over TCP
            join_ft_runtime()
            return
        start_ft_runtime(server_args.tp_size, server_args.model_path, http_server.app,
                         server_args.enable_metrics)


def after_scheduler_init(_result, scheduler, server_args, port_args, *args, **kwargs):
    """Under `--ft`, attach the FT worker: heartbeats, the controller's orders, in-place recovery."""
    ft = ft_args()
    if not ft.enabled or not ft.runtime_dir:
        return
    from sglang.srt.runtime_context import get_parallel

    ft = ft.for_replica(get_parallel().dp_rank)  # under --dp-size, this replica's controller and store
    publish(ft)

    from sglang_ft.elastic_tp.groups import set_collective_timeout
    from sglang_ft.elastic_tp.joiner import joiner_identity
    from sglang_ft.managers.ft_worker import FtWorker, install_worker

    parallel = get_parallel()
    joiner = joiner_identity()
    if joiner is None:
        worker = FtWorker(scheduler, ft, parallel.tp_rank, port_args, group=tuple(range(parallel.tp_size)),
                          dp_rank=parallel.dp_rank or 0, kv_slots=scheduler.token_to_kv_pool_allocator.size)
    else:  # a restarted worker: alone until the controller plans it back in (elastic_tp/joiner.py)
        worker = FtWorker(scheduler, ft, joiner.worker, port_args, joining=True, dp_rank=parallel.dp_rank or 0,
                          kv_slots=scheduler.token_to_kv_pool_allocator.size)
        allocator_slots = scheduler.token_to_kv_pool_allocator.size
        if allocator_slots != joiner.kv_slots:
            raise RuntimeError(f"sglang-ft: restarted worker {joiner.worker} has {allocator_slots} KV slots, the "
                               f"group has {joiner.kv_slots}")
    if ft.kv_backup:
        worker.start_kv_backup(scheduler.tp_worker.model_runner, scheduler.token_to_kv_pool_allocator)
    install_worker(worker)
    from sglang_ft.layers.attention import remainder_placement

    remainder_placement.install(scheduler, ft, worker.kv_stream)
    worker.arm_faults_on_signals()  # kill_unsent, fail_step, kill_uncopied (ft/faults.py)
    # From now on a collective stuck on a dead or hung peer fails after the FT timeout, so survivors regroup.
    set_collective_timeout(ft.collective_timeout_s)
    if joiner is None:  # the groups a single failure leaves, connected in the background from now on
        from sglang_ft.distributed.standby_groups import form_next

        form_next(worker, worker.group, 0)


def around_dispatch_event_loop(original, scheduler, *args, **kwargs):
    """Under `--ft`, SGLang's scheduler loop runs inside the FT worker, which recovers failed collectives."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is None:
        return original(scheduler, *args, **kwargs)
    return worker.run_event_loop(lambda s: original(s, *args, **kwargs))


def before_ingest_requests(scheduler, *args, **kwargs):
    """Top of every scheduler iteration: join a regroup the controller ordered, even without a local failure; else
    stamp the iteration's start, which the heartbeats report (a survivor blocked on a hung peer)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None:
        worker.check_orders()
        graph_refresh.between_steps()  # a chunk of the device graphs' re-capture after a regroup, if any
        worker.begin_iteration()


def around_run_batch(original, scheduler, batch, *args, **kwargs):
    """Remember the batch whose forward a failure interrupted: its tokens' KV is partial (park_requests.py); after
    the first batch that completes, the worker's heartbeats say it is serving; its time is the worker's step time.
    An iteration that had no work at its top has some now: its start is stamped for the heartbeats from here.
    Then, outside the forward pass, the step's KV rows go to the backup store (kv_backup_stream.after_step), and
    under --dp-size rank 0 tells the store which slots hold each request (replica_kv.py)."""
    from sglang_ft.layers.elastic_parallel import COLLECTIVES
    from sglang_ft.managers.ft_worker import current_worker

    COLLECTIVES.reset()
    worker = current_worker()
    if worker is not None:  # work that arrived in this iteration
        worker.batch_started()
    started = time.perf_counter()
    try:
        result = original(scheduler, batch, *args, **kwargs)
    except Exception:
        if worker is not None:
            worker.step_failed(batch)
        raise
    if worker is not None:
        worker.record_step(time.perf_counter() - started, None if _on_cuda(scheduler) else COLLECTIVES.seconds)
        if worker.kv_stream is not None:
            if worker.die_before_next_copy:
                logger.warning("sglang-ft: worker %d dies after a step, before backing up its KV (injected fault)",
                               worker.worker)
                os.kill(os.getpid(), signal.SIGKILL)
            from sglang_ft.layers.attention.remainder_placement import active

            worker.kv_stream.after_step(batch, active())
        if worker.maps_requests:  # under --dp-size, TP rank 0 maps requests to slots for the store
            worker.kv_stream.map_requests(batch)
        if worker.injected_step_failure(batch):
            raise InjectedStepFailure("the step's last collective timed out on this worker alone (injected fault)")
    return result


def around_init_parallel_groups(original, *args, **kwargs):
    """Under `--ft`, before a scheduler's first process group: NCCL errors raise in the survivor instead of
    ending it (`nccl_env.py`); the TCP connections the groups open are recorded, so an interrupt for a newer
    group shuts those alone (`group_interrupt.py`)."""
    if not ft_enabled():
        return original(*args, **kwargs)
    from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS
    from sglang_ft.distributed.nccl_env import apply_nccl_error_handling

    apply_nccl_error_handling()
    with GROUP_CONNECTIONS.recording():
        return original(*args, **kwargs)


class InjectedStepFailure(CollectiveFailure):
    """The "fail_step" fault: this worker takes a step the others finish as failed (see torn_step.py)."""


def _on_cuda(scheduler) -> bool:
    return str(scheduler.tp_worker.model_runner.device).startswith("cuda")


def _kv_stream():
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    return None if worker is None else worker.kv_stream


def after_free_slots(_result, allocator, free_index, *_args, **_kwargs):
    """Freed token slots no longer hold backed-up KV, nor remainder heads' KV (hybrid attention)."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.freed_by_sglang(free_index)
    stream = _kv_stream()
    if stream is not None:
        stream.on_slots_freed(allocator, free_index)


def after_clear_allocator(_result, allocator, *_args, **_kwargs):
    """A flush frees every slot: none holds backed-up KV (or remainder heads' KV) any more."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.clear()
    stream = _kv_stream()
    if stream is not None:
        stream.on_allocator_cleared(allocator)


def around_pull_raw_reqs(original, receiver, *args, **kwargs):
    """Rank 0 remembers what it pulled from the tokenizer manager, to re-send it if a failure interrupts delivery;
    a newly elected rank 0 first waits for the tokenizer manager's output counts (output_rewind.py)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is None:
        return original(receiver, *args, **kwargs)
    from sglang_ft.managers.io_struct import for_replica, split_received_tokens

    def pull():  # SGLang's DP controller hands the journal's messages to every replica: keep this replica's
        return for_replica(original(receiver, *args, **kwargs), worker.dp_rank)

    if worker.counts_wait is not None:
        reqs = worker.counts_wait.pull_until_counted(pull)
        worker.counts_awaited()
    else:  # counts that come when none is awaited are stale: rewinding to them would duplicate output
        reqs = pull()
        reqs = split_received_tokens(reqs)[1] if reqs else reqs
    if reqs:
        worker.ledger.record_pulled(reqs)
    return reqs


def before_process_input_requests(scheduler, recv_reqs, *args, **kwargs):
    """Every rank drops requests it already holds (a journal re-send) and records the rest (received_requests.py);
    output counts from the tokenizer manager rewind what a dead rank 0 never sent (output_rewind.py)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is None or not recv_reqs:
        return None
    from sglang_ft.elastic_tp.received_requests import held_rids
    from sglang_ft.managers.io_struct import split_received_tokens, split_resume_tokens
    from sglang_ft.managers.scheduler_components.output_rewind import apply_received_tokens

    counts, recv_reqs = split_received_tokens(recv_reqs)
    for message in counts:
        apply_received_tokens(scheduler, worker.finished, message)
    resumes, recv_reqs = split_resume_tokens(recv_reqs)
    worker.add_resumes(resumes)
    fresh = worker.ledger.unseen(recv_reqs, held=held_rids(scheduler))
    worker.ledger.record_processed(fresh)
    return (scheduler, fresh, *args), kwargs


def after_handle_generate_request(_result, scheduler, recv_req, *_args, **_kwargs):
    """Under --dp-size, a request moved from a lost replica goes on after the output its client has
    (replica_move.py)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None and worker.resumes:
        from sglang_ft.managers.scheduler_components.replica_move import adopt_queued

        adopt_queued(scheduler, worker.resumes, recv_req.rid, worker.kv_stream)


def after_dp_controller_init(_result, controller, *_args, **_kwargs):
    """Under `--ft --dp-size`, SGLang's DP controller never blocks on a replica without a rank 0
    (replica_outbox.py)."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import install

        install(controller)


def around_dp_send_control_message(original, controller, message, *args, **kwargs):
    """Under `--ft`, the journal's request to renew a replica's socket (a new rank 0) stops at the DP controller."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import renew_on_request

        if renew_on_request(controller, message):
            return None
    return original(controller, message, *args, **kwargs)


def after_update_active_ranks(_result, controller, *_args, **_kwargs):
    """Under `--ft`, a replica the journal reports lost leaves the DP controller's routing and broadcasts."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import drop_inactive

        drop_inactive(controller)


def after_stream_output(_result, streamer, reqs, *_args, **_kwargs):
    """Remember the requests that just finished: a dying rank 0 may not have sent their end (output_rewind.py);
    under hybrid attention they no longer count towards their owner's load."""
    from sglang_ft.layers.attention.remainder_placement import active
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None:
        worker.finished.record(reqs)
    if (placement := active()) is not None:
        placement.finished(reqs)


def after_release_aborted_request(_result, scheduler, req, *_args, **_kwargs):
    """Under hybrid attention, a request dropped from SGLang's queues no longer counts towards its owner's load."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.aborted_before_running(req)


def around_match_kv_cache(original, req, tree_cache, *args, **kwargs):
    """Under hybrid attention, a request's owner is chosen at its first radix-cache match, knowing which workers
    hold its cached prefix's remainder rows (layers/attention/hybrid_attention.py; rows the owner lacks are copied to
    it)."""
    from sglang_ft.layers.attention import remainder_placement

    if remainder_placement.active() is None:
        return original(req, tree_cache, *args, **kwargs)
    return remainder_placement.around_match_kv_cache(original, req, tree_cache, *args, **kwargs)


def around_send_output(original, sender, output, *args, **kwargs):
    """The "kill_unsent" fault: die after a step, before its output leaves (the tokens a dying rank 0 computed and
    never sent, on purpose)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None and worker.die_before_next_send and getattr(output, "rids", None):
        logger.warning("sglang-ft: worker %d dies before sending the output of %d requests (injected fault)",
                       worker.worker, len(output.rids))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(sender, output, *args, **kwargs)


def around_dispatch_to_scheduler(original, tokenizer_manager, obj, *args, **kwargs):
    """Under `--ft`, the tokenizer manager journals what it sends, to re-send it to a newly elected rank 0."""
    if ft_enabled():
        from sglang_ft.managers.tokenizer_manager_components.sent_requests import JOURNAL

        JOURNAL.record(tokenizer_manager, obj)
    return original(tokenizer_manager, obj, *args, **kwargs)


def before_validate_one_request(tokenizer_manager, obj, input_ids, *args, **kwargs):
    """Under `--ft`, refuse out-of-vocabulary token ids and n < 1 with a 400 (`entrypoints/input_checks.py`)."""
    if ft_enabled():
        from sglang_ft.entrypoints.input_checks import check_generate_input

        check_generate_input(obj, input_ids, tokenizer_manager.model_config.vocab_size)


def after_validate_detokenize(error, serving, request, *args, **kwargs):
    """Under `--ft`, `/v1/detokenize` of an id outside the vocabulary is a 400, not upstream's 500."""
    if ft_enabled() and error is None:
        from sglang_ft.entrypoints.input_checks import detokenize_error

        return detokenize_error(request.tokens, serving.tokenizer_manager.model_config.vocab_size)
    return None


def after_sigterm(_result, signal_handler, *args, **kwargs):
    """Under `--ft`, SGLang's drain on SIGTERM ends after `--ft-drain-timeout-s` (`entrypoints/shutdown.py`)."""
    if ft_enabled():
        from sglang_ft.entrypoints.shutdown import bound_the_drain

        bound_the_drain(signal_handler.tokenizer_manager, ft_args().drain_timeout_s)


def around_launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func,
                                      *args, **kwargs):
    """Under `--ft`, the launcher keeps SGLang's scheduler launch arguments to restart dead workers with them."""
    if ft_enabled():
        from sglang_ft.entrypoints.worker_spawner import remember_launch

        remember_launch(server_args, port_args, run_scheduler_process_func)
    return original(cls, server_args, port_args, run_scheduler_process_func, *args, **kwargs)


def around_create_ipc_channels(original, cls, *args, **kwargs):
    """A restarted worker starts as a TP group of one, so SGLang takes it for rank 0: it must not open the
    tokenizer manager's channels (it would take requests meant for the real rank 0) until a regroup makes it
    rank 0 for real."""
    from sglang_ft.elastic_tp.joiner import joiner_identity
    from sglang_ft.managers.ft_worker import current_worker

    if kwargs.get("is_rank_zero") and current_worker() is None and joiner_identity() is not None:
        kwargs["is_rank_zero"] = False
    return original(cls, *args, **kwargs)


def around_watchdog_check(original, watchdog, *args, **kwargs):
    """Under `--ft`, a dead scheduler is the FT controller's to recover; the launcher stays up while any lives."""
    if not ft_enabled():
        return original(watchdog, *args, **kwargs)
    schedulers = [(p, n) for p, n in zip(watchdog._processes, watchdog._names) if n.startswith("scheduler")]
    others = [(p, n) for p, n in zip(watchdog._processes, watchdog._names) if not n.startswith("scheduler")]
    from sglang_ft.entrypoints.worker_spawner import restarted_worker_alive

    if schedulers and not any(p.is_alive() for p, _ in schedulers) and not restarted_worker_alive():
        others = schedulers + others  # every TP worker is gone, restarted ones too: nothing left to recover with
    saved = watchdog._processes, watchdog._names
    watchdog._processes, watchdog._names = [p for p, _ in others], [n for _, n in others]
    try:
        return original(watchdog, *args, **kwargs)
    finally:
        watchdog._processes, watchdog._names = saved


def after_get_model_architecture(result, model_config, *_args, **_kwargs):
    """Under `--ft`, serve Llama-family architectures with the elastic model."""
    if not ft_enabled():
        return result
    _cls, arch = result
    if arch not in ELASTIC_ARCHITECTURES:
        raise ValueError(f"--ft supports {ELASTIC_ARCHITECTURES}, not {arch}")
    from sglang_ft.models.elastic_llama import ElasticLlamaForCausalLM

    return ElasticLlamaForCausalLM, arch


def _elastic_shard(model_config):
    """This rank's shard where the elastic model serves `model_config` in a TP process, else None."""
    if not ft_enabled() or getattr(model_config, "is_draft_model", False):
        return None
    archs = getattr(model_config.hf_config, "architectures", None) or []
    if not any(a in ELASTIC_ARCHITECTURES for a in archs):
        return None
    from sglang_ft.distributed_state import local_shard

    try:
        return local_shard(model_config.hf_text_config)
    except (RuntimeError, ValueError, AttributeError):
        return None  # no TP group in this process (e.g. the launcher sizing memory)


def around_get_num_kv_heads(original, model_config, *args, **kwargs):
    """KV heads on this rank: the layout's (unequal) count under `--ft`."""
    shard = _elastic_shard(model_config)
    return original(model_config, *args, **kwargs) if shard is None else shard.num_kv_heads


def around_get_num_attention_heads(original, model_config, *args, **kwargs):
    """Query heads on this rank: the layout's (unequal) count under `--ft`."""
    shard = _elastic_shard(model_config)
    if shard is None:
        return original(model_config, *args, **kwargs)
    return shard.num_kv_heads * (model_config.num_attention_heads // model_config.get_total_num_kv_heads())


def around_safetensors_iterator(original, hf_weights_files, *args, **kwargs):
    """Under `--ft`, yield lazy tensors so each rank reads only its own slices from the files."""
    if not ft_enabled():
        return original(hf_weights_files, *args, **kwargs)
    from sglang_ft.model_loader.lazy_safetensors import lazy_safetensors_iterator

    return lazy_safetensors_iterator(hf_weights_files)


def around_adjust_unaligned_cpu_tp(original, model_config, *args, **kwargs):
    """Under `--ft`, keep the true head and MLP sizes: SGLang's CPU path pads them for uneven TP, the elastic
    model splits them unevenly instead."""
    if ft_enabled():
        return model_config
    return original(model_config, *args, **kwargs)


def after_apply_token_constraints(token_capacity, *_args, **_kwargs):
    """Under `--ft`, ranks holding more heads fit fewer tokens: every rank takes the TP group's minimum. A
    restarted worker takes the group's token slots, so slot numbers mean the same on every rank."""
    if not ft_enabled():
        return token_capacity
    import torch
    from sglang.srt.runtime_context import get_parallel

    from sglang_ft.elastic_tp.joiner import joiner_identity

    joiner = joiner_identity()
    if joiner is not None:
        if joiner.kv_slots > token_capacity:
            raise RuntimeError(f"sglang-ft: restarted worker {joiner.worker} fits {token_capacity} KV tokens, the "
                               f"group has {joiner.kv_slots}")
        return joiner.kv_slots

    parallel = get_parallel()
    if parallel.tp_size == 1:
        return token_capacity
    tensor = torch.tensor(token_capacity, dtype=torch.int64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=parallel.tp_group.cpu_group)
    return int(tensor.item())


_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_WEIGHT_UTILS = "sglang.srt.model_loader.weight_utils"
_DP_CONTROLLER = "sglang.srt.managers.data_parallel_controller.DataParallelController"

HOOKS: list[tuple[str, HookType, object]] = [
    (f"{_SERVER_ARGS}.add_cli_args", HookType.AFTER, after_add_cli_args),
    (f"{_SERVER_ARGS}.from_cli_args", HookType.AROUND, around_from_cli_args),
    ("sglang.srt.entrypoints.http_server.launch_server", HookType.BEFORE, before_launch_server),
    ("sglang.srt.managers.scheduler.Scheduler.__init__", HookType.AFTER, after_scheduler_init),
    ("sglang.srt.distributed.bootstrap._init_parallel_groups", HookType.AROUND, around_init_parallel_groups),
    ("sglang.srt.managers.scheduler._dispatch_event_loop_once", HookType.AROUND, around_dispatch_event_loop),
    ("sglang.srt.managers.scheduler.Scheduler.ingest_requests", HookType.BEFORE, before_ingest_requests),
    (
        "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver._pull_raw_reqs",
        HookType.AROUND,
        around_pull_raw_reqs,
    ),
    ("sglang.srt.managers.scheduler.Scheduler.process_input_requests", HookType.BEFORE, before_process_input_requests),
    ("sglang.srt.managers.scheduler.Scheduler.run_batch", HookType.AROUND, around_run_batch),
    ("sglang.srt.managers.scheduler.Scheduler.handle_generate_request", HookType.AFTER,
     after_handle_generate_request),
    ("sglang.srt.managers.scheduler.Scheduler._release_aborted_request", HookType.AFTER,
     after_release_aborted_request),
    (
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output",
        HookType.AFTER,
        after_stream_output,
    ),
    (
        "sglang.srt.managers.scheduler_components.output_sender.SenderWrapper.send_output",
        HookType.AROUND,
        around_send_output,
    ),
    ("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", HookType.AFTER, after_free_slots),
    ("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.clear", HookType.AFTER, after_clear_allocator),
    ("sglang.srt.mem_cache.common.match_kv_cache", HookType.AROUND, around_match_kv_cache),
    (
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler",
        HookType.AROUND,
        around_dispatch_to_scheduler,
    ),
    ("sglang.srt.utils.watchdog.SubprocessWatchdog._check_processes", HookType.AROUND, around_watchdog_check),
    (f"{_DP_CONTROLLER}.__init__", HookType.AFTER, after_dp_controller_init),
    (f"{_DP_CONTROLLER}.update_active_ranks", HookType.AFTER, after_update_active_ranks),
    (f"{_DP_CONTROLLER}.send_control_message", HookType.AROUND, around_dp_send_control_message),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", HookType.BEFORE,
     before_validate_one_request),
    ("sglang.srt.managers.tokenizer_manager.SignalHandler.sigterm_handler", HookType.AFTER, after_sigterm),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.is_ready", HookType.AROUND, around_is_ready),
    ("sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._validate_request", HookType.AFTER,
     after_validate_detokenize),
    (
        "sglang.srt.entrypoints.engine.Engine._launch_scheduler_processes",
        HookType.AROUND,
        around_launch_scheduler_processes,
    ),
    (
        "sglang.srt.managers.scheduler_components.ipc_channels.SchedulerIpcChannels.create",
        HookType.AROUND,
        around_create_ipc_channels,
    ),
    ("sglang.srt.model_loader.utils.get_model_architecture", HookType.AFTER, after_get_model_architecture),
    ("sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends", HookType.AROUND,
     graph_refresh.around_init_attention_backends),
    ("sglang.srt.configs.model_config.ModelConfig.get_num_kv_heads", HookType.AROUND, around_get_num_kv_heads),
    (
        "sglang.srt.configs.model_config.ModelConfig.get_num_attention_heads",
        HookType.AROUND,
        around_get_num_attention_heads,
    ),
    (f"{_WEIGHT_UTILS}.safetensors_weights_iterator", HookType.AROUND, around_safetensors_iterator),
    (
        f"{_WEIGHT_UTILS}.buffered_multi_thread_safetensors_weights_iterator",
        HookType.AROUND,
        around_safetensors_iterator,
    ),
    (
        "sglang.srt.configs.update_config.adjust_config_with_unaligned_cpu_tp",
        HookType.AROUND,
        around_adjust_unaligned_cpu_tp,
    ),
    (
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._apply_token_constraints",
        HookType.AFTER,
        after_apply_token_constraints,
    ),
]
