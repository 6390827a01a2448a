"""Reshape an SGLang MHA KV pool to a new number of heads per rank, keeping its token slots.

Token slots, `req_to_token` and the radix tree stay valid: only the head dimension of each layer's K and V buffers
changes. Heads this rank keeps are copied; heads it gains are left to be restored (from a backup) or recomputed.
"""

from __future__ import annotations


def reshape_kv_heads(pool, keep: list[tuple[int, int]] | None, new_head_num: int) -> int:
    """Give `pool` `new_head_num` heads per layer; `keep` pairs (old_head, new_head) to copy. Returns bytes kept."""
    old_k, old_v = pool.k_buffer, pool.v_buffer
    pool.head_num = new_head_num
    pool.k_buffer = pool.v_buffer = None
    pool._create_buffers()
    pool.row_dim = pool.head_num * pool.head_dim
    pool.v_row_dim = pool.head_num * pool.v_head_dim
    kept = 0
    for old, new in keep or []:
        for src_layers, dst_layers in ((old_k, pool.k_buffer), (old_v, pool.v_buffer)):
            for src, dst in zip(src_layers, dst_layers):
                dst[:, new].copy_(src[:, old])
                kept += src[:, old].numel() * src.element_size()
    del old_k, old_v
    return kept
