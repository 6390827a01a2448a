"""Reshard the elastic model in place for a new layout: keep what this rank holds, take slices from peers, and
read only the slices nobody alive holds from the safetensors files.

Every rank computes the same plan (`ft.planner.plan_migration`), so peer transfers need no negotiation: each move
is one tagged isend/irecv pair of a flat buffer whose layout both sides derive from `unit_pieces`, over the TP
group's device group: both sides' buffers live on the model's device (NCCL takes device tensors only).

The transfers follow the planner's schedule (`schedule_transfers`, AnchorTP's bandwidth-aware transfers): every
rank issues its peer moves in `issue_order` (each inbound link's queue longest first, the same order on both ends
of every pair), each send's buffer flattened just before it goes, so the first moves are on the wire while later
ones are packed; then it copies the slices it keeps (local copies, not a link of the schedule) and reads its disk
queue, in the schedule's order, one checkpoint tensor at a time, landing the peer buffers that arrived between
tensors, so the local copies, disk and network overlap and the reshard takes about the busiest link's bytes over
its bandwidth.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ft.planner import DIMENSIONS, Bandwidth, MigrationPlan, issue_order, schedule_transfers
from sglang_ft.distributed.p2p import arrived, exchange, receive, send, wait, wait_all

# What the schedule's predicted time assumes (configured, not measured at runtime: the order it executes depends on
# bytes alone, longest first). GPUs: NVLink per direction and an NVMe drive (the scale model's figures, from their
# datasheets); CPUs: gloo over loopback and page-cached slice reads on the 2-core development machine (each alone
# 1.7-3.0 GB/s and 2.6-4.3 GB/s, benchmark/results/reshard_schedule_2026-12-03.md; the links share the cores, so the
# reshard there takes 4-5x what independent links would).
DEFAULT_BANDWIDTH = {"cuda": Bandwidth(p2p=450e9, disk=7e9), "cpu": Bandwidth(p2p=2e9, disk=4e9)}


@dataclass
class ReshardStats:
    bytes_kept: int = 0
    bytes_p2p_in: int = 0
    bytes_reloaded: int = 0  # from disk
    bytes_from_host_cache: int = 0  # from the node's copy of the checkpoint in host memory
    expert_bytes_moved: int = 0  # MoE experts' columns among bytes_p2p_in + bytes_reloaded
    predicted_s: float = 0.0  # the schedule's estimate of the transfers' time (the busiest link's)
    transfers_s: float = 0.0  # the peer and disk transfers' time here (and the kept slices' copies, which the
    #                           scheduled path runs while its peer moves are on the wire): what `predicted_s` estimates


def _nbytes(pieces) -> int:
    return sum(p.view.numel() * p.view.element_size() for p in pieces)


def _copy(src_pieces, dst_pieces) -> int:
    moved = 0
    for src, dst in zip(src_pieces, dst_pieces, strict=True):
        dst.view.copy_(src.view)
        moved += dst.view.numel() * dst.view.element_size()
    return moved


def _flat(pieces) -> torch.Tensor:
    return torch.cat([p.view.reshape(-1) for p in pieces])


def _landing_buffer(pieces) -> torch.Tensor:
    """A flat buffer for `pieces`, on their device (the group's)."""
    return torch.empty(sum(p.view.numel() for p in pieces), dtype=pieces[0].view.dtype, device=pieces[0].view.device)


def _unflatten_into(flat: torch.Tensor, pieces) -> None:
    offset = 0
    for piece in pieces:
        n = piece.view.numel()
        piece.view.copy_(flat[offset : offset + n].view_as(piece.view))
        offset += n


def build_model_like(old_model, model_runner):
    """A fresh elastic model for the layout now installed, on the runner's device and dtype (weights unset)."""
    from sglang_ft.sglang_surface import set_default_torch_dtype

    with set_default_torch_dtype(model_runner.model_config.dtype), torch.device(model_runner.device):
        new_model = type(old_model)(old_model.config)
    # SGLang's loader attaches facts to the model it built (e.g. shared_experts_config); carry them over.
    for name, value in vars(old_model).items():
        if name not in vars(new_model):
            setattr(new_model, name, value)
    return new_model.eval() if not old_model.training else new_model


@torch.no_grad()
def reshard(old_model, new_model, plan: MigrationPlan, me: int, checkpoint_dir: str, held,
            replicated_from: int | None = None, group=None, bandwidth: Bandwidth | None = None,
            scheduled: bool = True) -> ReshardStats:
    """Fill `new_model` (this worker's new shard) from `old_model`, peers and the checkpoint.

    `held` is what this worker held before (None for a restarted worker: its old model is a placeholder). With
    restarted workers in the group, rank `replicated_from` broadcasts the replicated tensors (norms) to all.
    `group` is the new TP group's device group (None: torch's default group). `bandwidth` is what the predicted
    time assumes (default: `DEFAULT_BANDWIDTH` for the model's device). `scheduled=False` takes the former path
    (every peer move posted at once, then every disk slice in one read), kept to measure the schedule against.
    """
    stats = ReshardStats()
    if held is not None:
        old_replicated = old_model.replicated_params()
        for name, param in new_model.replicated_params().items():
            param.copy_(old_replicated[name])
    if replicated_from is not None:
        for _name, param in sorted(new_model.replicated_params().items()):
            dist.broadcast(param.data, group=group, group_src=replicated_from)
    if new_model.layout.shape.num_experts:  # every unit of MLP columns is expert weights
        stats.expert_bytes_moved = sum(_nbytes(new_model.unit_pieces(m.dim, m.start, m.end)) for m in plan.moves
                                       if m.dst == me and m.dim == "mlp_columns")
    device = next(iter(new_model.replicated_params().values())).device
    schedule = schedule_transfers(plan, bandwidth or DEFAULT_BANDWIDTH.get(device.type, DEFAULT_BANDWIDTH["cuda"]))
    stats.predicted_s = schedule.estimated_s
    keep = lambda: _keep_local_slices(old_model, new_model, plan, me, held, stats)  # noqa: E731
    if not scheduled:  # the former path copied first
        keep()
    started = time.monotonic()
    if scheduled:
        _scheduled_transfers(old_model, new_model, plan, schedule, me, checkpoint_dir, group, stats, keep)
    else:
        _transfers_at_once(old_model, new_model, plan, schedule, me, checkpoint_dir, group, stats)
    stats.transfers_s = time.monotonic() - started
    return stats


def _keep_local_slices(old_model, new_model, plan: MigrationPlan, me: int, held, stats: ReshardStats) -> None:
    """Copy what this worker holds and keeps (its spans' overlap, its remainder heads, own moves) into the new
    shard: local copies, which the scheduled path runs while its peer moves are on the wire."""
    if held is not None:
        for dim in DIMENSIONS:
            (o0, o1), (n0, n1) = getattr(held, dim), getattr(new_model.shard, dim)
            lo, hi = max(o0, n0), min(o1, n1)
            if lo < hi:
                stats.bytes_kept += _copy(old_model.unit_pieces(dim, lo, hi), new_model.unit_pieces(dim, lo, hi))
        _keep_remainder_heads(old_model, new_model, stats)
    for move in plan.moves:
        if move.src == me and move.dst == me:  # own remainder heads that become TP heads here
            stats.bytes_kept += _copy(_source_pieces(old_model, move), _target_pieces(new_model, move))


def _scheduled_transfers(old_model, new_model, plan: MigrationPlan, schedule, me: int, checkpoint_dir: str, group,
                         stats: ReshardStats, keep) -> None:
    """The peer moves in `issue_order`, then the local copies (`keep`) and the disk queue tensor by tensor, landing
    arrived buffers meanwhile."""
    tag_of = {move: tag for tag, move in enumerate(plan.moves)}
    rank_of = {worker: rank for rank, worker in enumerate(plan.workers)}
    sent, landing = [], deque()
    for move in issue_order(schedule):
        if move.src == me:
            flat = _flat(_source_pieces(old_model, move))
            sent.append(send(rank_of[move.dst], tag_of[move], flat, group))
        elif move.dst == me:
            pieces = _target_pieces(new_model, move)
            buffer = _landing_buffer(pieces)
            landing.append((receive(rank_of[move.src], tag_of[move], buffer, group), buffer, pieces))

    def land(block: bool) -> None:
        while landing and (block or arrived(landing[0][0])):
            request, buffer, pieces = landing.popleft()
            wait(request)  # raises if the transfer failed
            _unflatten_into(buffer, pieces)
            stats.bytes_p2p_in += buffer.numel() * buffer.element_size()

    keep()
    for move in schedule.disk_queues.get(me, ()):
        pieces = _target_pieces(new_model, move)
        _read_checkpoint(checkpoint_dir, pieces, stats, between_tensors=lambda: land(block=False))
    land(block=True)
    wait_all(sent)


def _transfers_at_once(old_model, new_model, plan: MigrationPlan, schedule, me: int, checkpoint_dir: str, group,
                       stats: ReshardStats) -> None:
    """The former path: every peer move posted at once (by peer, in plan order), every disk slice read in one go
    meanwhile, then every wait."""
    rank_of = {worker: rank for rank, worker in enumerate(plan.workers)}
    sends, recvs, landing = [], [], []
    for tag, move in enumerate(plan.moves):
        if move.src == me and move.dst != me:
            sends.append((rank_of[move.dst], tag, _flat(_source_pieces(old_model, move))))
        elif move.dst == me and move.src not in (None, me):
            pieces = _target_pieces(new_model, move)
            buffer = _landing_buffer(pieces)
            recvs.append((rank_of[move.src], tag, buffer))
            landing.append((buffer, pieces))
    requests = exchange(rank_of[me], sends, recvs, group)
    from_disk = [p for m in plan.moves if m.src is None and m.dst == me for p in _target_pieces(new_model, m)]
    if from_disk:
        _read_checkpoint(checkpoint_dir, from_disk, stats)
    wait_all(requests)
    for buffer, pieces in landing:
        _unflatten_into(buffer, pieces)
        stats.bytes_p2p_in += buffer.numel() * buffer.element_size()


def _read_checkpoint(checkpoint_dir: str, pieces, stats: ReshardStats, between_tensors=None) -> None:
    """Fill `pieces` from the node's copy in host memory where it holds them (--ft-weight-cache), else from the
    checkpoint on disk, counting the bytes by source; `between_tensors()`, if given, runs after each checkpoint tensor
    (the chunk the reshard pipelines its peer transfers against)."""
    from sglang_ft.model_loader.weight_cache import read_slices

    from_cache, from_disk = read_slices(checkpoint_dir, pieces, between_tensors=between_tensors)
    stats.bytes_from_host_cache += from_cache
    stats.bytes_reloaded += from_disk


def _source_pieces(old_model, move) -> list:
    """What the sender of `move` holds: its TP span's slices, or its remainder heads'."""
    if move.from_remainder:
        return old_model.remainder_pieces(move.start, move.end)
    if move.to_remainder:  # a remainder head the sender holds in its TP span
        return old_model.unit_pieces("kv_heads", move.start, move.end)
    return old_model.unit_pieces(move.dim, move.start, move.end)


def _target_pieces(new_model, move) -> list:
    return (new_model.remainder_pieces(move.start, move.end) if move.to_remainder else
            new_model.unit_pieces(move.dim, move.start, move.end))


def _keep_remainder_heads(old_model, new_model, stats: ReshardStats) -> None:
    """The new layout's remainder heads this rank already holds (in its old span or its old remainder): copied.
    The plan moves the others here (`Move.to_remainder`)."""
    first, last = new_model.layout.remainder
    for head in range(first, last):
        held = old_model.head_pieces_held(head, head + 1)
        if held is not None:
            stats.bytes_kept += _copy(held, new_model.remainder_pieces(head, head + 1))
