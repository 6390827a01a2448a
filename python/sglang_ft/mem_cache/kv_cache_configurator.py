"""Adapter of `sglang.srt.mem_cache.kv_cache_configurator`: every rank of the TP group gets the same token slots."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


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
