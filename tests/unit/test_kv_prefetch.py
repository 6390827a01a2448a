"""The backup store's rows for the lost KV heads asked for while the weights are resharded
(elastic_tp/kv_restore.py: `StorePrefetch`): the restore fills the pool exactly as when it asks the store itself, asks
nothing more while the live slots are the ones prefetched, and asks again when they are not. A TP 4 -> 3 plan of
the tiny model (worker 3's head lost) on a CPU pool; the store is a function of (slot, head), so the expected rows
are known without the code under test."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ft.partition import TPLayout
from ft.planner import plan_migration

LAYERS, HEAD_DIM = 2, 4


class Pool:
    """SGLang's MHA KV pool as the restore sees it, on the CPU: per-layer K and V [slots, heads, dim]."""

    def __init__(self, slots: int, heads: int):
        self.layers, self.size, self.head_num, self.head_dim, self.v_head_dim = LAYERS, slots, heads, HEAD_DIM, HEAD_DIM
        self._create_buffers()

    def _create_buffers(self):
        shape = (self.size, self.head_num, self.head_dim)
        self.k_buffer = [torch.zeros(shape) for _ in range(self.layers)]
        self.v_buffer = [torch.zeros(shape) for _ in range(self.layers)]


class Allocator:
    size, page_size = 63, 1
    free_pages = torch.arange(20, 64)  # slots 1..19 are handed out
    release_pages = torch.empty(0, dtype=torch.int64)


def stored(heads: tuple[int, int], slots: torch.Tensor, sign: float) -> torch.Tensor:
    """The store's rows [layers, n, heads, dim]: each value names its layer, slot and global head."""
    layer = torch.arange(LAYERS).view(-1, 1, 1, 1)
    head = torch.arange(*heads).view(1, 1, -1, 1)
    return sign * (1000 * layer + 10 * slots.view(1, -1, 1, 1) + head).float().expand(-1, -1, -1, HEAD_DIM)


@pytest.fixture()
def lost_head(tiny_model, monkeypatch):
    """(plan, the worker that takes the lost head, its old and new heads, calls to the store)."""
    from transformers import AutoConfig

    from ft.model_config import model_shape_of
    from sglang_ft.elastic_tp import kv_restore

    shape = model_shape_of(AutoConfig.from_pretrained(tiny_model))
    old_layout = TPLayout.even(shape, 4)
    held = {w: old_layout.shard(w) for w in range(4)}
    plan = plan_migration(shape, held, [0, 1, 2])
    me = next(m.dst for m in plan.moves if m.dim == "kv_heads" and m.src is None)
    calls = []

    def fetch_rows(endpoint, epoch, heads, slots, members, dtype):
        calls.append((threading.current_thread().name, heads))
        return stored(heads, slots, 1.0), stored(heads, slots, -1.0), np.ones(len(slots), dtype=bool)

    monkeypatch.setattr(kv_restore, "fetch_rows", fetch_rows)
    return plan, me, held[me].kv_heads, plan.layout.shard(plan.workers.index(me)).kv_heads, calls


def restored(plan, me, old_heads, new_heads, prefetched=None) -> Pool:
    from sglang_ft.elastic_tp.kv_restore import restore_kv

    pool = Pool(64, old_heads[1] - old_heads[0])
    restore_kv(pool, Allocator(), old_heads, new_heads, plan, me, epoch=1, fetch_endpoint="tcp://store:1",
               prefetched=prefetched)
    return pool


def prefetched_for(plan, me, slots):
    """A prefetch of the store's rows at `slots` (a stale one: the regroup's is made by `prefetch_store_rows`)."""
    from sglang_ft.elastic_tp import kv_restore

    fetch = lambda heads, asked: kv_restore.fetch_rows("tcp://store:1", 1, heads, asked, (), torch.float32)  # noqa: E731
    return kv_restore.StorePrefetch(kv_restore.store_moves(plan, me), fetch, slots)


def test_the_prefetched_rows_fill_the_pool_as_the_restores_own_fetch_does(lost_head):
    plan, me, old_heads, new_heads, calls = lost_head
    asked_itself = restored(plan, me, old_heads, new_heads)
    lost = [(m.start, m.end) for m in plan.moves if m.dim == "kv_heads" and m.src is None and m.dst == me]
    assert [heads for _, heads in calls] == lost
    live = torch.arange(1, 20)
    first, last = lost[0]
    local = slice(first - new_heads[0], last - new_heads[0])
    assert torch.equal(asked_itself.k_buffer[1][live, local], stored(lost[0], live, 1.0)[1])  # the store's rows
    assert torch.equal(asked_itself.v_buffer[0][live, local], stored(lost[0], live, -1.0)[0])

    calls.clear()
    from sglang_ft.elastic_tp.kv_restore import prefetch_store_rows

    prefetch = prefetch_store_rows(plan, me, 1, "tcp://store:1", (), Allocator(), torch.float32)
    prefetch._thread.join(timeout=10)
    assert [heads for _, heads in calls] == lost and all(name == "ft-kv-prefetch" for name, _ in calls)
    with_prefetch = restored(plan, me, old_heads, new_heads, prefetch)
    assert len(calls) == len(lost)  # nothing asked again
    for layer in range(LAYERS):
        assert torch.equal(with_prefetch.k_buffer[layer], asked_itself.k_buffer[layer])
        assert torch.equal(with_prefetch.v_buffer[layer], asked_itself.v_buffer[layer])


def test_rows_prefetched_for_other_slots_are_asked_for_again(lost_head):
    plan, me, old_heads, new_heads, calls = lost_head
    stale = prefetched_for(plan, me, torch.arange(1, 10))  # before a flush changed the live slots
    pool = restored(plan, me, old_heads, new_heads, stale)
    lost = [(m.start, m.end) for m in plan.moves if m.dim == "kv_heads" and m.src is None and m.dst == me]
    assert [heads for _, heads in calls] == lost + lost  # the prefetch's, then the restore's own
    live, first = torch.arange(1, 20), lost[0][0]
    assert torch.equal(pool.k_buffer[0][live, first - new_heads[0]], stored(lost[0], live, 1.0)[0, :, 0])
