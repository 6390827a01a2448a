"""What the ranks of a group learn from each other over its CPU (gloo) channel: every rank's object, or whether any
rank says yes. The regroup's stages and a moved request's KV take-over agree this way before acting alike."""

from __future__ import annotations


def all_gather_object(mine, group) -> list:
    """Every rank's `mine`, in rank order (torch's all_gather_object, returning the list)."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def any_rank(flag: bool, cpu_group) -> bool:
    """True on every rank if `flag` is true on any."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(int(flag))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=cpu_group)
    return bool(tensor.item())
