"""Reshape an SGLang MHA KV pool to a new number of heads per rank, keeping its token slots.

Token slots and `req_to_token` keep their meaning: only the head dimension of each layer's K and V buffers
changes. Today the regroup flushes the caches first, so the new buffers start empty (the KV is recomputed);
restoring kept and backed-up heads into them is the KV-backup issue's work.
"""

from __future__ import annotations


def reshape_kv_heads(pool, new_head_num: int) -> None:
    """Give `pool` `new_head_num` heads per layer (fresh buffers of the same token capacity)."""
    pool.head_num = new_head_num
    pool.k_buffer = pool.v_buffer = None
    pool._create_buffers()
    pool.row_dim = pool.head_num * pool.head_dim
    pool.v_row_dim = pool.head_num * pool.v_head_dim
