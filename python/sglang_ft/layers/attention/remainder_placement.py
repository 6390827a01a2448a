"""The remainder heads' placement this scheduler process serves with: installed after every regroup (or at start)
where the layout has remainder heads, as hybrid attention (`hybrid_attention.py`) or cyclic placement
(`cyclic_placement.py`, `--ft-kv-placement cyclic`), and read by the model's forward and the scheduler's hooks."""

from __future__ import annotations

import logging

from sglang_ft.layers.attention.cyclic_placement import CyclicPlacement
from sglang_ft.layers.attention.hybrid_attention import RemainderPlacement
from sglang_ft.layers.attention.remainder_attention import RemainderKvPool

logger = logging.getLogger(__name__)

_active: RemainderPlacement | None = None


def active() -> RemainderPlacement | None:
    """This process's placement while its group serves with hybrid attention."""
    return _active


def install(scheduler, ft_args, stream=None) -> RemainderPlacement | None:
    """Give the model its placement where its layout has remainder heads (and drop any older one)."""
    global _active
    runner = scheduler.tp_worker.model_runner
    model = runner.model
    layout = model.layout
    _active = None
    if not layout.num_remainder_kv_heads:
        return None
    kv_pool = runner.token_to_kv_pool
    slots = kv_pool.k_buffer[0].shape[0]
    kind = CyclicPlacement if ft_args.kv_placement == "cyclic" else RemainderPlacement
    pool = RemainderKvPool(len(model.model.layers), layout.num_remainder_kv_heads, layout.shape.head_dim, slots,
                           capacity=kind.pool_rows(slots, layout.tp_size), dtype=kv_pool.k_buffer[0].dtype,
                           device=kv_pool.k_buffer[0].device)
    _active = model.remainder = kind(model.tp_rank, layout.tp_size, ft_args.routing, pool,
                                     runner.req_to_token_pool.req_to_token, layout.remainder, stream)
    if kind is CyclicPlacement:
        logger.info("sglang-ft: cyclic KV placement: %d KV heads per rank by TP, %d remainder heads rotating over "
                    "every rank token by token", model.shard.num_kv_heads, layout.num_remainder_kv_heads)
    else:
        logger.info("sglang-ft: hybrid attention: %d KV heads per rank by TP, %d remainder heads per request on its "
                    "owner (--ft-routing %s)", model.shard.num_kv_heads, layout.num_remainder_kv_heads,
                    ft_args.routing)
    return _active


def around_match_kv_cache(original, req, tree_cache, *args, **kwargs):
    """Choose the request's owner at its first radix-cache match, knowing who holds its cached prefix."""
    result = original(req, tree_cache, *args, **kwargs)
    placement = _active
    if placement is not None and placement.owns_requests and req.rid not in placement.router.owner_of:
        prefix = result.device_prefix_len
        slots = tree_cache.path_device_indices(result.last_device_node)[:prefix].cpu() if prefix else None
        placement.owner_of(req.rid, len(req.origin_input_ids) + req.sampling_params.max_new_tokens, slots)
    return result
