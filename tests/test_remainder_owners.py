"""Hybrid attention's placement in the scheduler (managers/remainder_owners.py), for ranks run as threads over an
in-memory all-reduce: owners, holders of every slot's remainder KV, copies of a cached prefix to a new owner,
releases, and the spread of cached slots after a regroup. The model's use of it is checked end to end against
transformers on a server (test_hybrid_attention.py)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sglang_ft.layers.remainder_attention import RemainderKvPool
from sglang_ft.managers.remainder_owners import ADOPT_BLOCK_SLOTS, RemainderPlacement

LAYERS, HEADS, DIM, SLOTS = 2, 1, 4, 64


class SumGroup:
    """all_reduce for ranks that are threads."""

    def __init__(self, size: int):
        self.size, self.parts, self.calls = size, [None] * size, 0
        self.barrier = threading.Barrier(size)

    def for_rank(self, rank: int):
        def all_reduce(x):
            self.parts[rank] = x.clone()
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return total

        return all_reduce


def placements(size: int, policy: str = "load", stream=None):
    group = SumGroup(size)
    req_to_token = torch.zeros((8, 32), dtype=torch.int32)
    ranks = [RemainderPlacement(r, size, policy, RemainderKvPool(LAYERS, HEADS, DIM, SLOTS, SLOTS), req_to_token,
                                heads=(3, 4), stream=stream, all_reduce=group.for_rank(r)) for r in range(size)]
    return ranks, group, req_to_token


def extend_batch(rids, pool_rows, seq_lens, new_counts, out_cache_loc):
    mode = SimpleNamespace(is_extend=lambda: True)
    return SimpleNamespace(forward_mode=mode, rids=rids, extend_seq_lens_cpu=new_counts,
                           seq_lens_cpu=torch.tensor(seq_lens), req_pool_indices=torch.tensor(pool_rows),
                           out_cache_loc=torch.tensor(out_cache_loc))


def on_every_rank(ranks, step):
    results, errors = [None] * len(ranks), []

    def one(rank):
        try:
            results[rank] = step(ranks[rank])
        except Exception as exc:  # surfaced below, with the rank
            errors.append((rank, exc))

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(ranks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return results


def write_owned(placement, batch, value_of_slot):
    """What the model's layers do with the batch: the owner writes its new tokens' rows (here: a value per slot)."""
    for layer in range(LAYERS):
        rows = value_of_slot(batch.new_slots).float()[:, None, None].expand(-1, HEADS, DIM) + layer
        placement.pool.write(layer, batch.new_slots, rows, -rows)


def test_owners_write_their_rows_and_a_prefix_reused_elsewhere_is_copied_to_the_new_owner():
    ranks, group, req_to_token = placements(3, "round_robin")
    # request a: 5 prompt tokens in slots 10..14, owned by rank 0 (round robin starts there)
    req_to_token[0, :5] = torch.arange(10, 15)
    batch = extend_batch(["a"], [0], [5], [5], list(range(10, 15)))
    views = on_every_rank(ranks, lambda p: p.batch(batch))
    for placement, view in zip(ranks, views):
        assert placement.holders[10:15].tolist() == [1] * 5  # every rank knows rank 0 holds them
        write_owned(placement, view, lambda s: s)
    assert [len(v.spans) for v in views] == [1, 0, 0] and views[0].rows.tolist() == [0, 1, 2, 3, 4]
    assert group.calls == 0  # nothing to copy

    # request b reuses a's first 4 tokens (a cached prefix) and adds 2; round robin gives it to rank 1
    req_to_token[1, :6] = torch.tensor([10, 11, 12, 13, 20, 21])
    batch = extend_batch(["b"], [1], [6], [2], [20, 21])
    views = on_every_rank(ranks, lambda p: p.batch(batch))
    assert group.calls == 1  # one all-reduce brought rank 1 the prefix rows
    assert all(p.holders[10:14].tolist() == [0b011] * 4 and p.holders[20:22].tolist() == [0b010] * 2 for p in ranks)
    assert ranks[1].rows_copied == 4 and ranks[0].rows_copied == ranks[2].rows_copied == 0
    k, v = ranks[1].pool.rows(torch.arange(10, 14))
    expected_k, expected_v = ranks[0].pool.rows(torch.arange(10, 14))
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v) and float(k[1, 2, 0, 0]) == 13.0
    span = views[1].spans[0]
    assert (span.start, span.count, span.slots.tolist()) == (0, 2, [10, 11, 12, 13, 20, 21])
    assert ranks[2].pool.used == 0  # a worker that owns nothing holds nothing


def two_ranks_after_one_prefill(stream):
    """Two ranks after request "a" (slots 5-7) prefilled on its owner, rank 0."""
    ranks, _, req_to_token = placements(2, "round_robin", stream)
    req_to_token[0, :3] = torch.tensor([5, 6, 7])
    batch = extend_batch(["a"], [0], [3], [3], [5, 6, 7])
    for placement, view in zip(ranks, on_every_rank(ranks, lambda p: p.batch(batch))):
        write_owned(placement, view, lambda s: s)
    return ranks


def test_a_freed_slot_is_forgotten_everywhere_and_dropped_from_the_backup_by_its_holders():
    drops = []
    stream = SimpleNamespace(drop_rows=lambda heads, slots: drops.append((heads, slots.tolist())),
                             write_rows=lambda *a: None)
    ranks = two_ranks_after_one_prefill(stream)
    assert ranks[0].pool.used == 3
    for placement in ranks:
        placement.release_slots(torch.tensor([5, 6, 7]))
    assert all(p.holders[5:8].tolist() == [0, 0, 0] for p in ranks) and ranks[0].pool.used == 0
    assert drops == [((3, 4), [5, 6, 7])]  # once, by the holder


def test_prefix_owner_is_the_least_loaded_holder_of_the_prefix():
    ranks, _, _ = placements(3, "prefix_load")
    placement = ranks[0]
    placement.holders[40:44] = 0b110  # ranks 1 and 2 hold the prefix
    placement.router.assign("busy", 100, 1)
    assert placement.owner_of("new", 10, torch.arange(40, 44)) == 2
    assert placement.owner_of("new", 10, torch.arange(40, 44)) == 2  # chosen once, kept
    assert placement.owner_of("fresh", 10) == 0  # no prefix: the least loaded worker


def test_a_request_aborted_in_the_queue_no_longer_loads_its_owner():
    placement = placements(2, "load")[0][0]
    for rid, tokens in (("queued", 500), ("running", 40)):
        placement.owner_of(rid, tokens)
    assert placement.router.load() == {0: 500, 1: 40}
    placement.aborted_before_running(SimpleNamespace(rid="running", kv=SimpleNamespace(holds_kv=True)))
    assert placement.router.load() == {0: 500, 1: 40}  # it still runs its last forward: released at its finish
    placement.aborted_before_running(SimpleNamespace(rid="queued", kv=SimpleNamespace(holds_kv=False)))
    assert placement.router.load() == {0: 0, 1: 40}
    assert placement.owner_of("next", 10) == 0  # the least loaded again


def test_after_a_regroup_cached_slots_are_spread_and_each_worker_fetches_its_own():
    ranks, _, _ = placements(3)
    resumed = [SimpleNamespace(rid=f"r{i}", slots=list(range(1 + 10 * i, 11 + 10 * i)), prompt_len=5, max_new_tokens=20)
               for i in range(3)]
    resumed.append(SimpleNamespace(rid="shares", slots=list(range(1, 6)) + [50], prompt_len=5, max_new_tokens=3))
    live = torch.tensor(list(range(1, 31)) + [50] + list(range(100 - 2 * ADOPT_BLOCK_SLOTS, 100)))
    store_k = torch.arange(SLOTS * 2, dtype=torch.float32)[None, :, None, None].expand(LAYERS, -1, HEADS, DIM)
    asked = {}

    def fetch_for(rank):
        def fetch(heads, slots):
            asked[rank] = (heads, slots.tolist())
            found = [s != 25 for s in slots.tolist()]  # the store lacks slot 25
            return store_k[:, slots], -store_k[:, slots], found
        return fetch

    ranks = [RemainderPlacement(r, 3, "load", RemainderKvPool(LAYERS, HEADS, DIM, 2 * SLOTS, 2 * SLOTS),
                                torch.zeros((1, 1), dtype=torch.int32), heads=(6, 8)) for r in range(3)]
    results = [p.adopt(resumed, live, fetch_for(r)) for r, p in enumerate(ranks)]
    owners = ranks[0].router.owner_of
    assert [owners[f"r{i}"] for i in range(3)] == [0, 1, 2]  # each resumed request's prefix whole on one worker
    assert owners["shares"] == 0 and ranks[0].holders[50] == 1  # its new slot joins the least loaded (rank 0: 10)
    rows = [sum(1 for s in live.tolist() if ranks[0].holders[s] >> r & 1) for r in range(3)]
    assert max(rows) - min(rows) <= ADOPT_BLOCK_SLOTS  # the other cached blocks even the workers out
    assert all(torch.equal(p.holders, ranks[0].holders) for p in ranks)  # every rank computed the same placement
    for r, placement in enumerate(ranks):
        heads, mine = asked[r]
        assert heads == (6, 8) and len(mine) == rows[r] == placement.pool.used + (25 in mine)
        restored, missing = results[r]
        assert (restored, missing) == (len(mine) - (25 in mine), int(25 in mine))
    k, _ = ranks[2].pool.rows(torch.tensor([21]))
    assert float(k[1, 0, 0, 0]) == 21.0


def test_adopting_without_a_store_reports_every_row_missing():
    ranks, _, _ = placements(2)
    assert ranks[1].adopt([], torch.arange(1, 40), lambda heads, slots: None)[1] > 0


@pytest.mark.parametrize("size", [32, 40])
def test_more_workers_than_holder_bits_are_refused(size):
    with pytest.raises(ValueError, match="at most 31 workers"):
        RemainderPlacement(0, size, "load", RemainderKvPool(1, 1, 1, 4, 4), torch.zeros((1, 1)), all_reduce=sum)


def test_a_restarted_backup_store_gets_every_remainder_row_this_worker_holds_again():
    sent = []
    stream = SimpleNamespace(write_rows=lambda layer, heads, slots, k, v: sent.append((layer, heads, slots.tolist(),
                                                                                       k[:, 0, 0].tolist())),
                             drop_rows=lambda *a: None)
    ranks = two_ranks_after_one_prefill(stream)
    assert ranks[0].resync() == LAYERS and ranks[1].resync() == 0
    assert sent == [(0, (3, 4), [5, 6, 7], [5.0, 6.0, 7.0]), (1, (3, 4), [5, 6, 7], [6.0, 7.0, 8.0])]


def test_sglang_dropping_a_queued_request_reaches_the_placement(monkeypatch):
    """The AFTER hook on SGLang's `Scheduler._release_aborted_request` (every queue it drops requests from)."""
    from sglang_ft import hooks
    from sglang_ft.managers import remainder_owners

    placement = placements(2, "load")[0][0]
    placement.owner_of("queued", 300)
    monkeypatch.setattr(remainder_owners, "_active", placement)
    hooks.after_release_aborted_request(None, object(), SimpleNamespace(rid="queued",
                                                                        kv=SimpleNamespace(holds_kv=False)))
    assert placement.router.load() == {0: 0, 1: 0}
