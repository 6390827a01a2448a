"""Adapter of `sglang.srt.mem_cache.common`: under hybrid attention a request's owner is chosen at its first match."""

from __future__ import annotations


def around_match_kv_cache(original, req, tree_cache, *args, **kwargs):
    """Under hybrid attention, a request's owner is chosen at its first radix-cache match, knowing which workers
    hold its cached prefix's remainder rows (managers/remainder_owners.py; rows the owner lacks are copied to it)."""
    from sglang_ft.managers import remainder_owners

    if remainder_owners.active() is None:
        return original(req, tree_cache, *args, **kwargs)
    return remainder_owners.around_match_kv_cache(original, req, tree_cache, *args, **kwargs)
