"""Adapter of `sglang.srt.managers.scheduler`: each TP scheduler gets an FT worker, which runs its loop, checks the
controller's orders every iteration, ledgers the requests it receives and watches every step."""

from __future__ import annotations

import logging
import os
import signal
import time

from sglang_ft.distributed.collective_failure import CollectiveFailure
from sglang_ft.server_args import ft_args, publish

logger = logging.getLogger(__name__)


class InjectedStepFailure(CollectiveFailure):
    """The "fail_step" fault: this worker takes a step the others finish as failed (see torn_step.py)."""


def after_init(_result, scheduler, server_args, port_args, *args, **kwargs):
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
        from sglang_ft.sglang_surface import restart_idle_sleeper

        restart_idle_sleeper(scheduler, rank_zero=False)  # never rank 0 when planned in, and no socket to poll yet
        allocator_slots = scheduler.token_to_kv_pool_allocator.size
        if allocator_slots != joiner.kv_slots:
            raise RuntimeError(f"sglang-ft: restarted worker {joiner.worker} has {allocator_slots} KV slots, the "
                               f"group has {joiner.kv_slots}")
    if ft.kv_backup:
        worker.start_kv_backup(scheduler.tp_worker.model_runner, scheduler.token_to_kv_pool_allocator)
    install_worker(worker)
    worker.idle_wake.attach(scheduler)  # under --sleep-on-idle: an order wakes an idle rank 0
    from sglang_ft.layers.attention import remainder_placement

    remainder_placement.install(scheduler, ft, worker.kv_stream)
    worker.arm_faults_on_signals()  # kill_unsent, fail_step, kill_uncopied (ft/faults.py)
    # From now on a collective stuck on a dead or hung peer fails after the FT timeout, so survivors regroup.
    set_collective_timeout(ft.collective_timeout_s)
    if joiner is None:  # the groups a single failure leaves, connected in the background from now on
        from sglang_ft.distributed.standby_groups import form_next

        form_next(worker, worker.group, 0)
    from sglang_ft.elastic_tp.regroup import import_stage_modules

    import_stage_modules()  # the first failure's survivors do not import them on the critical path


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
        from sglang_ft.elastic_tp import graph_refresh

        graph_refresh.between_steps()  # a chunk of the device graphs' re-capture after a regroup, if any
        worker.begin_iteration()


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


def _on_cuda(scheduler) -> bool:
    return str(scheduler.tp_worker.model_runner.device).startswith("cuda")


def after_handle_generate_request(_result, scheduler, recv_req, *_args, **_kwargs):
    """Under --dp-size, a request moved from a lost replica goes on after the output its client has
    (replica_move.py)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None and worker.resumes:
        from sglang_ft.managers.scheduler_components.replica_move import adopt_queued

        adopt_queued(scheduler, worker.resumes, recv_req.rid, worker.kv_stream)


def after_release_aborted_request(_result, scheduler, req, *_args, **_kwargs):
    """Under hybrid attention, a request dropped from SGLang's queues no longer counts towards its owner's load."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.aborted_before_running(req)
