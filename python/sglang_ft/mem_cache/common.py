"""Adapter of `sglang.srt.mem_cache.common`: under hybrid attention a request's owner is chosen at its first match."""

from __future__ import annotations


def around_match_kv_cache(original, req, tree_cache, *args, **kwargs):
    """Under hybrid attention, a request's owner is chosen at its first radix-cache match, knowing which workers
    hold its cached prefix's remainder rows (layers/attention/remainder_placement.py; rows the owner lacks are copied to it)."""
    from sglang_ft.layers.attention import remainder_placement

    if remainder_placement.active() is None:
        return original(req, tree_cache, *args, **kwargs)
    return remainder_placement.around_match_kv_cache(original, req, tree_cache, *args, **kwargs)
