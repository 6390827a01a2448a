"""Reshard the elastic model in place for a new layout: keep what this rank holds, take slices from peers, and
read only the slices nobody alive holds from the safetensors files.

Every rank computes the same plan (`ft.planner.plan_migration`), so peer transfers need no negotiation: each move
is one tagged isend/irecv pair of a flat buffer whose layout both sides derive from `unit_pieces`, over the TP
group's device group: both sides' buffers live on the model's device (NCCL takes device tensors only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ft.planner import DIMENSIONS, MigrationPlan
from sglang_ft.distributed.p2p import exchange, wait_all


@dataclass
class ReshardStats:
    bytes_kept: int = 0
    bytes_p2p_in: int = 0
    bytes_reloaded: int = 0  # from disk
    bytes_from_host_cache: int = 0  # from the node's copy of the checkpoint in host memory
    expert_bytes_moved: int = 0  # MoE experts' columns among bytes_p2p_in + bytes_reloaded


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
            replicated_from: int | None = None, group=None) -> ReshardStats:
    """Fill `new_model` (this worker's new shard) from `old_model`, peers and the checkpoint.

    `held` is what this worker held before (None for a restarted worker: its old model is a placeholder). With
    restarted workers in the group, rank `replicated_from` broadcasts the replicated tensors (norms) to all.
    `group` is the new TP group's device group (None: torch's default group).
    """
    stats = ReshardStats()
    if held is not None:
        for dim in DIMENSIONS:
            (o0, o1), (n0, n1) = getattr(held, dim), getattr(new_model.shard, dim)
            lo, hi = max(o0, n0), min(o1, n1)
            if lo < hi:
                stats.bytes_kept += _copy(old_model.unit_pieces(dim, lo, hi), new_model.unit_pieces(dim, lo, hi))
        old_replicated = old_model.replicated_params()
        for name, param in new_model.replicated_params().items():
            param.copy_(old_replicated[name])
    if replicated_from is not None:
        for _name, param in sorted(new_model.replicated_params().items()):
            dist.broadcast(param.data, group=group, group_src=replicated_from)
    if held is not None:
        _keep_remainder_heads(old_model, new_model, stats)

    rank_of = {worker: rank for rank, worker in enumerate(plan.workers)}
    sends, recvs, landing = [], [], []
    for tag, move in enumerate(plan.moves):
        if move.src is None:
            continue
        if move.src == me:
            held_pieces = _source_pieces(old_model, move)
            if move.dst == me:  # own remainder heads that become TP heads here
                stats.bytes_kept += _copy(held_pieces, _target_pieces(new_model, move))
                continue
            sends.append((rank_of[move.dst], tag, _flat(held_pieces)))
        elif move.dst == me:
            pieces = _target_pieces(new_model, move)
            buffer = torch.empty(sum(p.view.numel() for p in pieces), dtype=pieces[0].view.dtype,
                                 device=pieces[0].view.device)
            recvs.append((rank_of[move.src], tag, buffer))
            landing.append((buffer, pieces))
    requests = exchange(rank_of[me], sends, recvs, group)
    # Peer transfers are in flight; read the slices nobody alive holds from disk meanwhile (both links busy).
    from_disk = [p for m in plan.moves if m.src is None and m.dst == me for p in _target_pieces(new_model, m)]
    if new_model.layout.shape.num_experts:  # every unit of MLP columns is expert weights
        stats.expert_bytes_moved = sum(_nbytes(new_model.unit_pieces(m.dim, m.start, m.end)) for m in plan.moves
                                       if m.dst == me and m.dim == "mlp_columns")
    if from_disk:  # from the node's copy in host memory where it holds them (--ft-weight-cache), else from disk
        from sglang_ft.model_loader.weight_cache import read_slices

        stats.bytes_from_host_cache, stats.bytes_reloaded = read_slices(checkpoint_dir, from_disk)
    wait_all(requests)
    for buffer, pieces in landing:
        _unflatten_into(buffer, pieces)
        stats.bytes_p2p_in += buffer.numel() * buffer.element_size()
    return stats


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
