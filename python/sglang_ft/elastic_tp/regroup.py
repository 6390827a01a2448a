"""In-place regroup of one surviving scheduler, stage by stage (one log line per stage).

1. rebuild SGLang's process groups for the new world on a fresh store;
2. park every unfinished request in the radix cache with the KV it committed (`park_requests`): nothing is
   prefilled again, each request computes only its next token when it is re-admitted;
   when restarted workers join, every rank then takes rank 0's scheduler state (`scheduler_sync`): the waiting
   requests, the radix cache of their KV and the allocator, so the newcomers are in lockstep with the others;
   then every rank checks that all agree on what shapes the next batch (`lockstep_check`: where not, every rank
   flushes its radix cache, before any KV moves by slot number);
3. reshard the weights by the plan (keep, peer to peer, disk);
4. reshape the KV pool to this rank's new heads and fill every cached slot: kept heads stay, heads that move
   between survivors go peer to peer, the dead worker's heads come from the KV backup store. Where the store
   lacks rows (a step's, which the backup copies after the step), every rank cuts each cached prefix before its
   first lacking token and SGLang recomputes only the rest (counted, `partial_restore`);
5. reconcile the requests every rank holds, then resume SGLang's loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ft.messages import Regroup, RegroupDone
from ft.partition import RankShard
from ft.planner import plan_migration
from sglang_ft.sglang_surface import (
    point_scheduler_at_parallel_groups,
    restart_idle_sleeper,
    set_engine_paused,
    start_load_snapshot_writer,
    swap_model,
    swap_scheduler_ipc_sockets,
)

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


def recompute_everything(scheduler) -> None:
    """The fallback: drop every cached token's KV (requests re-prefill from scratch)."""
    if not scheduler.flush_cache(empty_cache=False):
        raise RuntimeError("sglang-ft: could not flush the caches for the KV recompute fallback")


def agree_on_restore(num_slots: int, kv, placement, cpu_group) -> tuple[bool, object]:
    """One all-reduce for the restore's outcome, the same on every rank: did any rank fail to restore at all (`kv`
    None: its pool cannot be trusted), and else a bool per token slot: does any rank lack rows of it?"""
    import torch
    import torch.distributed as dist

    from sglang_ft.elastic_tp.partial_restore import lacking_slots

    mask = torch.zeros(num_slots + 1, dtype=torch.uint8)
    if kv is None:
        mask[num_slots] = 1
    else:
        mask[:num_slots] = lacking_slots(num_slots, *kv.lacking, placement.lacking if placement is not None else None)
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=cpu_group)
    return bool(mask[num_slots]), None if mask[num_slots] else mask[:num_slots].bool()


def take_over_tokenizer_channels(scheduler, port_args) -> None:
    """This worker is the new TP rank 0: open the sockets to the tokenizer and detokenizer that the dead rank 0 held.

    The tokenizer manager binds its PUSH socket and the detokenizer its PULL socket, so connecting here is all it
    takes; requests queued for the old rank 0 now flow to this one, and the journal re-sends the rest.
    """
    swap_scheduler_ipc_sockets(scheduler, port_args)
    # Publish /v1/loads from here on: SGLang gives only the rank 0 it started a snapshot writer, so after that
    # process dies the endpoint (and every router reading it) would report its last load forever.
    start_load_snapshot_writer(scheduler, port_args)
    from sglang_ft.observability.metrics_collector import take_over_scheduler_metrics

    take_over_scheduler_metrics(scheduler)
    logger.warning("sglang-ft: this worker is now TP rank 0 and talks to the tokenizer manager")


def await_output_counts(ft_worker, epoch: int) -> None:
    """The old rank 0 may have died before sending its last step's output: before its first step, this new rank 0
    waits for the tokenizer manager's count of what it received (output_rewind.py), if it holds any output."""
    from sglang_ft.elastic_tp.groups import REQUEST_BROADCAST_TIMEOUT_S
    from sglang_ft.managers.scheduler_components.output_rewind import (
        MAX_WAIT_S,
        ReceivedTokensWait,
        may_hold_undelivered_output,
    )

    if ft_worker.counts_wait is None and may_hold_undelivered_output(ft_worker.scheduler, ft_worker.finished):
        # the other ranks wait in the request broadcast meanwhile: stay well inside its timeout
        bound = min(REQUEST_BROADCAST_TIMEOUT_S, ft_worker.ft.collective_timeout_s) / 2
        ft_worker.expect_output_counts(ReceivedTokensWait(epoch, min(MAX_WAIT_S, bound)))


STAGE_MODULES = (  # what the regroup imports inside its functions (late: some import this module's callers)
    "ft.kv_backup", "sglang_ft.distributed.rank_agreement", "sglang_ft.distributed.standby_groups",
    "sglang_ft.distributed_state", "sglang_ft.elastic_tp.graph_refresh", "sglang_ft.elastic_tp.groups",
    "sglang_ft.elastic_tp.kv_restore", "sglang_ft.elastic_tp.lockstep_check", "sglang_ft.elastic_tp.park_requests",
    "sglang_ft.elastic_tp.partial_restore", "sglang_ft.elastic_tp.received_requests", "sglang_ft.elastic_tp.reshard",
    "sglang_ft.elastic_tp.scheduler_sync", "sglang_ft.elastic_tp.torn_step",
    "sglang_ft.layers.attention.remainder_placement", "sglang_ft.managers.scheduler_components.output_rewind",
    "sglang_ft.mem_cache.kv_backup_stream", "sglang_ft.observability.metrics_collector",
)


def import_stage_modules() -> None:
    """Import the regroup's stage modules at the worker's start, not during its first failure: their first import
    cost 23 ms on an idle core (kv_restore alone 12), paid by every survivor at once on the critical path (a server
    usually meets its first regroup then)."""
    import importlib

    for name in STAGE_MODULES:
        importlib.import_module(name)


def regroup_in_place(ft_worker, order: Regroup) -> RegroupDone:
    from ft.kv_backup import BLOCK_TOKENS
    from sglang_ft.distributed.rank_agreement import all_gather_object
    from sglang_ft.distributed.standby_groups import build_groups, form_next
    from sglang_ft.distributed_state import install_layout
    from sglang_ft.elastic_tp.groups import describe_last_rebuild
    from sglang_ft.elastic_tp.kv_restore import prefetch_store_rows, reshape_kv_heads, restore_kv
    from sglang_ft.elastic_tp.lockstep_check import agree_or_flush, fingerprint
    from sglang_ft.elastic_tp.park_requests import park_every_request
    from sglang_ft.elastic_tp.partial_restore import keep_held_prefixes
    from sglang_ft.elastic_tp.received_requests import reconcile, reconcile_report
    from sglang_ft.elastic_tp.reshard import build_model_like, reshard
    from sglang_ft.elastic_tp.scheduler_sync import sync_scheduler_state
    from sglang_ft.elastic_tp.torn_step import complete_torn_step, is_torn
    from sglang_ft.layers.attention import remainder_placement
    from sglang_ft.elastic_tp import graph_refresh

    scheduler, me = ft_worker.scheduler, ft_worker.worker
    runner = scheduler.tp_worker.model_runner
    clock = StageClock(order.epoch)
    logger.warning("sglang-ft: worker %d regrouping to epoch %d with workers %s (%s)", me, order.epoch,
                   list(order.workers), order.cause)
    set_engine_paused(scheduler, True)  # lets the caches be flushed with requests queued
    if ft_worker.kv_stream is not None:  # the completed steps' KV copies still in flight go to the store first
        ft_worker.kv_stream.pipeline.flush()
    graphs = graph_refresh.drop_device_graphs(runner)  # they replay the old model: eager until re-captured

    old_model = runner.model
    new_rank = order.workers.index(me)
    newer = lambda: (latest := ft_worker.orders.latest) is not None and latest.epoch > order.epoch  # noqa: E731
    standby = build_groups(ft_worker, order, newer)  # rank 0 stays on node 0, the controller's
    point_scheduler_at_parallel_groups(scheduler)
    clock.done("rebuild_process_groups", f"(rank {new_rank} of {len(order.workers)}"
                                         f"{', from standby groups' if standby else ''}: {describe_last_rebuild()})")
    if new_rank == 0 and (not ft_worker.group or ft_worker.group[0] != me):
        take_over_tokenizer_channels(scheduler, ft_worker.port_args)
        await_output_counts(ft_worker, order.epoch)
        clock.done("take_over_tokenizer", "(this worker is the new rank 0)")
    restart_idle_sleeper(scheduler, rank_zero=new_rank == 0)  # --sleep-on-idle: rank 0 only, on the sockets it holds
    ft_worker.idle_wake.attach(scheduler)
    cpu_group, joining, failed = scheduler.tp_cpu_group, me in order.joining, ft_worker.failed_batch
    gather = lambda mine: all_gather_object(mine, cpu_group)  # noqa: E731
    first = agree_before_planning(old_model if ft_worker.holds_weights else None, scheduler, failed, joining,
                                  order, cpu_group)
    plan = plan_regroup(old_model.layout.shape, first.held, first.remainder_held, order,
                        ft_worker.ft.splits_remainder)
    clock.done("plan_migration", f"(holdings of {len(first.held)} members agreed, {len(plan.moves)} moves)")

    advanced = complete_torn_step(scheduler, failed, gather, new_rank, joining=joining, everyone=first.outputs)
    parked, kv_tokens, recomputed = park_every_request(  # a torn step changed what the ranks committed: asked again
        scheduler, failed, gather, joining=joining, completed_elsewhere=advanced,
        everyone=None if is_torn(first.outputs) else first.committed)
    ft_worker.forget_failed_batch()
    kv_was_intact = ft_worker.start_kv_rebuild()  # not intact until the pool holds every cached slot's new heads
    clock.done("park_requests", f"({parked} requests, {kv_tokens} KV tokens kept in the radix cache)")
    if order.joining:
        synced = sync_scheduler_state(scheduler, ft_worker, scheduler.tp_cpu_group, receive=me in order.joining)
        clock.done("sync_scheduler_state", f"({synced.requests} waiting requests, {synced.cached_tokens} cached "
                                           f"tokens in {synced.sequences} sequences, from rank 0)")
    # the lockstep check's fingerprints and the reconcile stage's reports in one gather (the queues do not change
    # in between); the check comes before any KV moves by slot
    fingerprints, reports = zip(*gather((fingerprint(scheduler), reconcile_report(scheduler, ft_worker.ledger,
                                                                                  is_source=new_rank == 0))))
    differed = agree_or_flush(scheduler, list(fingerprints), lambda: recompute_everything(scheduler))
    if differed:
        recomputed = kv_tokens
    clock.done("lockstep_check", "(the schedulers differed: radix caches flushed)" if differed else "")

    store = ft_worker.ft.kv_fetch_endpoint if ft_worker.kv_stream and order.kv_store_alive else None
    members = tuple(zip(order.workers, order.pids))
    prefetch = prefetch_store_rows(plan, me, order.epoch, store, members, scheduler.token_to_kv_pool_allocator,
                                   runner.token_to_kv_pool.k_buffer[0].dtype) if kv_was_intact else None
    install_layout(plan.layout)  # the store's rows for the lost heads come meanwhile
    new_model = build_model_like(old_model, runner)
    device_group = scheduler.tp_group.device_group  # the transfers' tensors live on the model's device
    stats = reshard(old_model, new_model, plan, me, runner.model_config.model_path, first.held.get(me),
                    replicated_from=0 if order.joining else None, group=device_group)
    swap_model(runner, new_model)  # complete: every slice arrived, whatever happens to the rest of the regroup
    placement = remainder_placement.install(scheduler, ft_worker.ft, ft_worker.kv_stream)  # hybrid attention only
    ft_worker.holds_group(order.workers)  # what this worker holds now matches the new group, even if a later
    del old_model                         # stage fails and another regroup follows
    clock.done("reshard_weights", f"(kept {stats.bytes_kept} B, peers {stats.bytes_p2p_in} B, host cache "
                                  f"{stats.bytes_from_host_cache} B, disk {stats.bytes_reloaded} B; schedule predicted "
                                  f"{stats.predicted_s * 1e3:.1f} ms)")

    old_heads = first.held[me].kv_heads if first.held.get(me) is not None else None
    pool, new_heads = runner.token_to_kv_pool, new_model.shard.kv_heads
    kv = None
    if kv_was_intact:
        kv = restore_kv(pool, scheduler.token_to_kv_pool_allocator, old_heads, new_heads, plan, me, order.epoch,
                        store, members, group=device_group, prefetched=prefetch)
    else:  # an earlier attempt stopped half way through the KV: its contents cannot be trusted
        reshape_kv_heads(pool, new_heads[1] - new_heads[0])
    if ft_worker.kv_stream is not None:
        ft_worker.kv_stream.follow(pool, new_heads, order.epoch)
    remainder_restored = remainder_missing = 0
    if placement is not None and kv is not None:
        remainder_restored, remainder_missing = restore_remainder_kv(placement, ft_worker, order)
        kv.blocks_restored += placement.pool.k.shape[2] * -(-remainder_restored // BLOCK_TOKENS)
    flushed, lacking = agree_on_restore(pool.k_buffer[0].shape[0], kv, placement, cpu_group)
    missing = flushed
    if flushed:  # a pool whose contents cannot be trusted at all
        recompute_everything(scheduler)
        recomputed = kv_tokens
    else:  # rows the store lacked (a step's, copied after the step): every cached prefix is cut before them
        missing = bool(lacking.any())
        if missing:
            recomputed += keep_held_prefixes(scheduler, lacking, ft_worker.kv_stream, placement)
    ft_worker.kv_rebuilt()
    from sglang_ft.observability.metrics_collector import after_kv_reshape

    after_kv_reshape(scheduler)  # SGLang's KV gauges describe the reshaped pool
    clock.done("restore_kv", f"({new_heads[1] - new_heads[0]} KV heads here; " + (
        f"{kv.live_slots} cached slots: {kv.heads_kept} heads kept, {kv.bytes_p2p_in} B from peers, "
        f"{kv.blocks_restored} blocks from the backup store" if kv else "not restored") +
        (f"; remainder heads' rows of {remainder_restored} slots" if placement is not None else "") +
        (f"; {recomputed} tokens to recompute" if missing else "") + ")")

    backend = graph_refresh.recreate_attention_backend(runner)
    clock.done("recreate_attention_backend", f"({backend.describe()})")

    dropped, resent = reconcile(scheduler, ft_worker.ledger, cpu_group, list(reports), is_source=new_rank == 0)
    set_engine_paused(scheduler, False)
    clock.done("reconcile_and_resume", f"(dropped {dropped}, re-sent {resent})")
    graph_refresh.schedule_recapture(ft_worker, graphs, order.epoch)  # between the next steps: its own stage
    form_next(ft_worker, tuple(order.workers), order.epoch)  # in the background, for the next single failure
    return RegroupDone(me, order.epoch, clock.ms, stats.bytes_kept, stats.bytes_p2p_in, stats.bytes_reloaded,
                       recomputed, kv_blocks_restored=0 if flushed else kv.blocks_restored,
                       kv_bytes_p2p=0 if kv is None else kv.bytes_p2p_in, pid=os.getpid(),
                       layout_json=plan.layout.to_json(), expert_bytes_moved=stats.expert_bytes_moved,
                       bytes_from_host_cache=stats.bytes_from_host_cache)


def restore_remainder_kv(placement, ft_worker, order: Regroup) -> tuple[int, int]:
    """Hybrid attention: spread the cached slots' remainder heads over the new group, each worker's share from the
    backup store (every head's KV is there, whoever held it); (slots restored, slots missing) here."""
    from sglang_ft.elastic_tp.kv_restore import fetch_rows
    from sglang_ft.elastic_tp.scheduler_sync import cached_sequences
    from sglang_ft.mem_cache.kv_backup_stream import live_slots

    endpoint = ft_worker.ft.kv_fetch_endpoint if ft_worker.kv_stream and order.kv_store_alive else None
    members = tuple(zip(order.workers, order.pids))
    fetch = lambda heads, slots: fetch_rows(endpoint, order.epoch, heads, slots, members,  # noqa: E731
                                            placement.pool.k.dtype)
    scheduler = ft_worker.scheduler
    return placement.adopt(cached_sequences(scheduler), live_slots(scheduler.token_to_kv_pool_allocator), fetch)


@dataclasses.dataclass(frozen=True)
class FirstAgreement:
    """What every member said before the plan: its holdings (`holdings_of`), and per rank its requests' output
    lengths (`torn_step.output_lengths`) and committed KV (`park_requests.committed_lengths`)."""

    held: dict
    remainder_held: dict
    outputs: list
    committed: list


def agree_before_planning(model, scheduler, failed_batch, joining: bool, order: Regroup, cpu_group) -> FirstAgreement:
    """One all-gather over the CPU group for what three stages ask of every member: the holdings the plan is made
    from, the output lengths that show a torn step, the KV lengths the parking keeps. Each was its own gather
    (two collectives each in torch's form) while every stream waited; none depends on another stage's outcome,
    except the parking's after a torn step (then asked again).

    The holdings: each member's model is always complete (a reshard replaces it only once every slice arrived),
    but a regroup interrupted by another failure can leave members at different layouts: asking them is the only
    truth, and every member then computes the same plan from the same answers.
    """
    from sglang_ft.distributed.rank_agreement import all_gather_object
    from sglang_ft.elastic_tp.park_requests import committed_lengths
    from sglang_ft.elastic_tp.torn_step import output_lengths

    mine = (holding_of(model), output_lengths(scheduler, failed_batch, joining),
            committed_lengths(scheduler, failed_batch, joining))
    everyone = all_gather_object(mine, cpu_group)
    held, remainder_held = holdings_of(order, [holding for holding, _, _ in everyone])
    return FirstAgreement(held, remainder_held, [outputs for _, outputs, _ in everyone],
                          [committed for _, _, committed in everyone])


def holding_of(model) -> tuple[dict, tuple[int, int]] | None:
    """What this member says it holds (None: no weights): its shard and its remainder heads."""
    return None if model is None else (dataclasses.asdict(model.shard), model.layout.remainder)


def holdings_of(order: Regroup, everyone: list) -> tuple[dict, dict]:
    """Every member's answer (`holding_of`, in rank order) as (shards held by worker, remainder heads held)."""
    held, remainder_held = {}, {}
    for worker, holding in zip(order.workers, everyone, strict=True):
        if holding is None:
            continue
        shard, remainder = holding
        held[worker] = RankShard(**{k: tuple(v) for k, v in shard.items()})
        if remainder[0] < remainder[1]:
            remainder_held[worker] = tuple(remainder)
    return held, remainder_held


def plan_regroup(shape, held: dict, remainder_held: dict, order: Regroup, hybrid: bool):
    """The migration to the ordered group: planned here, by every member alike from the same answers, and by no one
    else (the controller orders who forms the group; what each member holds only the members know)."""
    return plan_migration(shape, held, list(order.workers), hybrid=hybrid, remainder_held=remainder_held)

