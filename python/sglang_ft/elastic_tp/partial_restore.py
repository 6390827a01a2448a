"""After a regroup whose KV restore lacks some rows: keep each cached prefix up to its first lacking token.

The KV backup copies a step's rows after the step (mem_cache/kv_backup_stream.py), so a worker killed during a step
or between its end and the copy takes that step's rows of its heads with it: at most the last step's tokens of
each request in flight. Instead of flushing every cache, every rank cuts the same radix tree: each parked request's
cached sequence keeps the longest prefix whose rows the new group holds for every head, and the tree and allocator
are rebuilt from the cut sequences (`scheduler_sync.apply_snapshot`, the rebuild a joiner's regroup does). When a
parked request is re-admitted, SGLang's own prefix match then yields only the held prefix, and it prefills the
missing tail again. (As in that rebuild, a cached prefix no waiting request uses is freed: SGLang's radix tree
cannot be listed from Python; it is recomputed only if it is asked for again.)
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch


def held_prefix(slots: np.ndarray, lacking: np.ndarray) -> int:
    """Tokens of a sequence before the first one whose slot lacks rows."""
    missing = np.flatnonzero(lacking[slots])
    return int(missing[0]) if len(missing) else len(slots)


def cut_sequences(sequences, lacking: np.ndarray) -> tuple[list, int]:
    """Each `scheduler_sync.CachedSequence` cut to its held prefix (empty ones left out), and the tokens cut: what
    the requests will compute again."""
    kept, cut = [], 0
    for seq in sequences:
        n = held_prefix(seq.slots, lacking)
        cut += len(seq.slots) - n
        if n:
            kept.append(dataclasses.replace(seq, token_ids=seq.token_ids[:n], slots=seq.slots[:n]))
    return kept, cut


def lacking_slots(num_slots: int, *lacking: torch.Tensor) -> torch.Tensor:
    """A bool per token slot: does any of `lacking` (slot numbers this rank could not restore) name it?"""
    mask = torch.zeros(num_slots, dtype=torch.bool)
    for slots in lacking:
        if slots is not None and len(slots):
            mask[torch.as_tensor(slots, dtype=torch.int64)] = True
    return mask


def keep_held_prefixes(scheduler, lacking: torch.Tensor, kv_stream=None, placement=None) -> int:
    """Cut the radix cache to the rows the group holds (`lacking`: the same bool per slot on every rank); returns
    the tokens parked requests will compute again."""
    from sglang_ft.elastic_tp.scheduler_sync import apply_snapshot, take_snapshot
    from sglang_ft.mem_cache.kv_backup_stream import slots_in_use

    snapshot = take_snapshot(scheduler, with_requests=False)
    snapshot["sequences"], cut = cut_sequences(snapshot["sequences"], lacking.numpy())
    allocator = scheduler.token_to_kv_pool_allocator
    before = slots_in_use(allocator)
    # SGLang's radix insert "frees" a key's duplicate slots, which during the rebuild are slots the tree keeps: the
    # free hook must not release their remainder rows (a kept prefix would lose its holders); what the cut really
    # freed is released below
    with placement.keeping_slots() if placement is not None else contextlib.nullcontext():
        apply_snapshot(scheduler, snapshot, take_requests=False, kv_stream=kv_stream)
    if placement is not None:  # the remainder heads' rows of the freed slots go too
        placement.release_slots(torch.nonzero(before & ~slots_in_use(allocator)).flatten())
    return cut
