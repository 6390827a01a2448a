"""In-place regroup of one surviving scheduler, stage by stage (one log line per stage).

1. abort the step in flight: SGLang's own retract puts every running request back in the waiting queue with
   the tokens it has committed, and the caches are flushed (their KV is recomputed on re-admission and counted);
2. rebuild SGLang's process groups for the new world on a fresh store;
3. reshard the weights by the plan (keep, peer to peer, disk);
4. reshape the KV pool to this rank's new heads;
5. reconcile the requests every rank holds, then resume SGLang's loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ft.messages import Regroup, RegroupDone
from ft.partition import TPLayout
from ft.planner import plan_migration

logger = logging.getLogger(__name__)


class StageClock:
    def __init__(self, epoch: int):
        self.epoch = epoch
        self.ms: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, stage: str, detail: str = "") -> None:
        now = time.monotonic()
        self.ms[stage] = round((now - self._last) * 1e3, 2)
        self._last = now
        logger.info("sglang-ft: recovery to epoch %d: %s done in %.1f ms %s", self.epoch, stage, self.ms[stage], detail)


def requeue_everything(scheduler) -> int:
    """Retract every running request into the waiting queue and flush the caches; returns tokens to recompute."""
    from sglang.srt.managers.io_struct import PauseGenerationReqInput

    running = [r for r in scheduler.running_batch.reqs if not r.finished()]
    if scheduler.last_batch is not None:
        running += [r for r in scheduler.last_batch.reqs if not r.finished() and r not in running]
    tokens = sum(len(r.origin_input_ids) + len(r.output_ids) for r in running)
    scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
    if not scheduler.flush_cache(empty_cache=False):
        raise RuntimeError("sglang-ft: could not flush the caches after retracting every request")
    return tokens


def refresh_group_handles(scheduler) -> None:
    """The scheduler, its TP worker and model runner cache group handles at init; point them at the new ones."""
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


def take_over_tokenizer_channels(scheduler, port_args) -> None:
    """This worker is the new TP rank 0: open the sockets to the tokenizer and detokenizer that the dead rank 0 held.

    The tokenizer manager binds its PUSH socket and the detokenizer its PULL socket, so connecting here is all it
    takes; requests queued for the old rank 0 now flow to this one, and the journal re-sends the rest.
    """
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
    logger.warning("sglang-ft: this worker is now TP rank 0 and talks to the tokenizer manager")


def regroup_in_place(ft_worker, order: Regroup) -> RegroupDone:
    from sglang_ft.distributed.regroup_groups import rebuild_process_groups
    from sglang_ft.distributed_state import install_layout
    from sglang_ft.managers.request_ledger import reconcile
    from sglang_ft.mem_cache.kv_reshape import reshape_kv_heads
    from sglang_ft.model_executor.reshard import build_model_like, reshard

    scheduler, me = ft_worker.scheduler, ft_worker.worker
    runner = scheduler.tp_worker.model_runner
    clock = StageClock(order.epoch)
    logger.warning("sglang-ft: worker %d regrouping to epoch %d with workers %s (%s)", me, order.epoch,
                   list(order.workers), order.cause)

    tokens_to_recompute = requeue_everything(scheduler)
    clock.done("abort_and_requeue", f"({tokens_to_recompute} tokens to recompute)")

    old_model = runner.model
    held = {w: old_model.layout.shards[r] for r, w in enumerate(ft_worker.group)}
    plan = plan_migration(old_model.layout.shape, held, list(order.workers))
    if plan.layout != TPLayout.from_json(order.layout_json):
        raise RuntimeError("sglang-ft: this worker's plan differs from the controller's")
    new_rank = order.workers.index(me)
    rebuild_process_groups(new_rank, len(order.workers), order.store_port, ft_worker.ft.collective_timeout_s)
    refresh_group_handles(scheduler)
    if new_rank == 0 and ft_worker.group[0] != me:
        take_over_tokenizer_channels(scheduler, ft_worker.port_args)
    clock.done("rebuild_process_groups", f"(rank {new_rank} of {len(order.workers)})")

    install_layout(plan.layout)
    new_model = build_model_like(old_model, runner)
    stats = reshard(old_model, new_model, plan, me, runner.model_config.model_path)
    runner.model = new_model
    ft_worker.group = tuple(order.workers)  # what this worker holds now matches the new group, even if a later
    del old_model                           # stage fails and another regroup follows
    clock.done("reshard_weights", f"(kept {stats.bytes_kept} B, peers {stats.bytes_p2p_in} B, "
                                  f"disk {stats.bytes_reloaded} B)")

    reshape_kv_heads(runner.token_to_kv_pool, new_model.shard.num_kv_heads)
    clock.done("reshape_kv", f"({new_model.shard.num_kv_heads} KV heads here)")

    dropped, resent = reconcile(scheduler, ft_worker.ledger, scheduler.tp_cpu_group, is_source=new_rank == 0)
    scheduler._engine_paused = False
    clock.done("reconcile_and_resume", f"(dropped {dropped}, re-sent {resent})")
    return RegroupDone(me, order.epoch, clock.ms, stats.bytes_kept, stats.bytes_p2p_in, stats.bytes_reloaded,
                       tokens_to_recompute)
