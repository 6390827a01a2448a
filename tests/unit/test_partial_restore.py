"""A restore that lacks a step's rows keeps every cached prefix up to its first lacking token
(elastic_tp/partial_restore.py), on SGLang's own radix cache and allocator, with rows from a real backup store."""

import contextlib

import numpy as np
import torch
from tests.unit.test_scheduler_sync import SLOTS, cache, make_rank, request, slots_of

from ft.kv_backup import Geometry, KvFetch, KvWrite, encode
from ft.kv_store import KvStore
from sglang_ft.elastic_tp.partial_restore import cut_sequences, keep_held_prefixes, lacking_slots

G = Geometry(num_layers=2, num_kv_heads=2, head_dim=4, slots=SLOTS, itemsize=4)
LOST = (1, 2)  # the dead worker's head


def store_holding(slots) -> KvStore:
    """A store that received the dead worker's rows of `slots` only (every layer)."""
    store = KvStore()
    rows = np.zeros((len(slots), 1, G.head_dim), dtype=np.uint32)
    for seq, layer in enumerate(range(G.num_layers)):
        header = KvWrite(epoch=0, worker=1, seq=seq, layer=layer, heads=LOST, geometry=G)
        store.apply([encode(header), np.asarray(slots, dtype=np.int64).tobytes(), rows.tobytes(), rows.tobytes()])
    return store


def lacking_after_fetch(store: KvStore, live) -> torch.Tensor:
    frames = store.fetch(KvFetch(epoch=1, heads=LOST), np.asarray(live, dtype=np.int64).tobytes())
    found = np.frombuffer(frames[-1], dtype=bool)
    return lacking_slots(SLOTS, torch.as_tensor(live)[~torch.as_tensor(found.copy())])


def parked_rank():
    """Two parked requests sharing a prompt, each with its tokens cached, and the slots SGLang gave them."""
    rank = make_rank()
    cache(rank, [1, 2, 3, 4, 10, 11, 12])
    cache(rank, [1, 2, 3, 4, 20, 21])
    rank.waiting_queue = [request("a", [1, 2, 3, 4], [10, 11, 12, 13]), request("b", [1, 2, 3, 4], [20, 21, 22])]
    return rank


def test_a_request_keeps_exactly_the_prefix_the_store_holds_and_recomputes_the_tail():
    rank = parked_rank()
    a, b = slots_of(rank, (1, 2, 3, 4, 10, 11, 12)), slots_of(rank, (1, 2, 3, 4, 20, 21))
    last_step = [a[-1], b[-1]]  # the dead worker's last step: one decode token of each request, never copied
    live = sorted(set(a) | set(b))
    lacking = lacking_after_fetch(store_holding([s for s in live if s not in last_step]), live)
    assert sorted(torch.nonzero(lacking).flatten().tolist()) == sorted(last_step)

    free_before = rank.token_to_kv_pool_allocator.available_size()
    recomputed = keep_held_prefixes(rank, lacking)
    assert slots_of(rank, (1, 2, 3, 4, 10, 11, 12)) == a[:-1] and slots_of(rank, (1, 2, 3, 4, 20, 21)) == b[:-1]
    expected = sum(len(s) - next(i for i, slot in enumerate(s) if slot in last_step) for s in (a, b))
    assert recomputed == expected == 2  # one step's token per request in flight
    assert rank.token_to_kv_pool_allocator.available_size() == free_before + 2  # their slots are free again


def test_a_shared_prefix_missing_a_row_cuts_every_request_using_it():
    rank = parked_rank()
    a, b = slots_of(rank, (1, 2, 3, 4, 10, 11, 12)), slots_of(rank, (1, 2, 3, 4, 20, 21))
    live = sorted(set(a) | set(b))
    held = [s for s in live if s != a[2]]  # the shared prompt's third token is missing
    recomputed = keep_held_prefixes(rank, lacking_after_fetch(store_holding(held), live))
    assert slots_of(rank, (1, 2, 3, 4, 10, 11, 12)) == a[:2] and slots_of(rank, (1, 2, 3, 4, 20, 21)) == b[:2]
    assert recomputed == (len(a) - 2) + (len(b) - 2)


def test_nothing_lacking_changes_nothing_and_everything_lacking_keeps_nothing():
    rank = parked_rank()
    a = slots_of(rank, (1, 2, 3, 4, 10, 11, 12))
    assert keep_held_prefixes(rank, torch.zeros(SLOTS, dtype=torch.bool)) == 0
    assert slots_of(rank, (1, 2, 3, 4, 10, 11, 12)) == a
    assert keep_held_prefixes(rank, torch.ones(SLOTS, dtype=torch.bool)) == 7 + 6
    assert slots_of(rank, (1, 2, 3, 4)) == [] and rank.token_to_kv_pool_allocator.available_size() == SLOTS


def test_remainder_rows_of_the_freed_slots_are_released():
    rank = parked_rank()
    a = slots_of(rank, (1, 2, 3, 4, 10, 11, 12))
    released = []
    placement = type("Placement", (), {"release_slots": lambda self, s: released.extend(s.tolist()),
                                       "keeping_slots": lambda self: contextlib.nullcontext()})()
    keep_held_prefixes(rank, lacking_slots(SLOTS, torch.tensor([a[-1]])), placement=placement)
    assert released == [a[-1]]


def test_cut_sequences_counts_what_it_cuts():
    from sglang_ft.elastic_tp.scheduler_sync import CachedSequence

    seqs = [CachedSequence([1, 2, 3], np.array([5, 6, 7]), None, None, 2, 0),
            CachedSequence([4], np.array([9]), None, None, 1, 0)]
    lacking = np.zeros(16, dtype=bool)
    lacking[[6, 9]] = True
    kept, cut = cut_sequences(seqs, lacking)
    assert [(s.token_ids, s.slots.tolist()) for s in kept] == [([1], [5])] and cut == 3


def test_a_kept_prefix_keeps_its_remainder_rows_through_the_rebuilds_frees(monkeypatch):
    """SGLang's radix insert "frees" a key's duplicate slots, which during the rebuild are slots the tree keeps; with
    the free hook on (as in a server), only the slots the cut really freed lose their remainder rows. Before, the
    rebuild released the shared prompt's rows too, and the next step found "a cached slot has no holder of its
    remainder heads' KV" (a chaos soak: a rejoin into hybrid attention after the backup store restarted)."""
    from sglang_ft.layers.attention import remainder_placement
    from sglang_ft.mem_cache.allocator import token as allocator_hooks
    from sglang_ft.layers.attention.hybrid_attention import RemainderPlacement

    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_radix_cache import ComponentType, UnifiedRadixCache

    rank = make_rank()  # the tree SGLang 0.5.23 serves with (its Rust core frees an inserted key's duplicate slots)
    rank.tree_cache = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=rank.token_to_kv_pool_allocator,
        page_size=1, tree_components=(ComponentType.FULL,)))
    cache(rank, [1, 2, 3, 4, 10, 11, 12])
    cache(rank, [1, 2, 3, 4, 20, 21])
    rank.waiting_queue = [request("a", [1, 2, 3, 4], [10, 11, 12, 13]), request("b", [1, 2, 3, 4], [20, 21, 22])]
    a = slots_of(rank, (1, 2, 3, 4, 10, 11, 12))
    released = []

    class Recording(RemainderPlacement):
        def __init__(self):  # only the release bookkeeping matters here
            pass

        def release_slots(self, slots):
            released.extend(slots.tolist())

    placement = Recording()
    monkeypatch.setattr(remainder_placement, "_active", placement)
    allocator = rank.token_to_kv_pool_allocator
    free = allocator.free

    def free_with_the_hook(free_index):  # what the plugin's AFTER hook on TokenToKVPoolAllocator.free does
        result = free(free_index)
        allocator_hooks.after_free(result, allocator, free_index)
        return result

    monkeypatch.setattr(allocator, "free", free_with_the_hook)
    keep_held_prefixes(rank, lacking_slots(SLOTS, torch.tensor([a[-1]])), placement=placement)
    assert released == [a[-1]]
    assert slots_of(rank, (1, 2, 3, 4, 10, 11, 12)) == a[:-1]
