"""Adapter of `sglang.srt.mem_cache.allocator.token`: freed token slots hold no backed-up or remainder KV."""

from __future__ import annotations


def _kv_stream():
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    return None if worker is None else worker.kv_stream


def after_free(_result, allocator, free_index, *_args, **_kwargs):
    """Freed token slots no longer hold backed-up KV, nor remainder heads' KV (hybrid attention)."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.freed_by_sglang(free_index)
    stream = _kv_stream()
    if stream is not None:
        stream.on_slots_freed(allocator, free_index)


def after_clear(_result, allocator, *_args, **_kwargs):
    """A flush frees every slot: none holds backed-up KV (or remainder heads' KV) any more."""
    from sglang_ft.layers.attention.remainder_placement import active

    if (placement := active()) is not None:
        placement.clear()
    stream = _kv_stream()
    if stream is not None:
        stream.on_allocator_cleared(allocator)
