"""Hybrid attention's and cyclic placement's bookkeeping in the scheduler (layers/attention/hybrid_attention.py,
cyclic_placement.py), for ranks run as threads over an in-memory all-reduce: owners, holders of every slot's
remainder KV, copies of a cached prefix to a new owner, releases, and the spread of cached slots after a regroup.
The model's use of it is checked end to end against transformers on a server (test_hybrid_attention.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tests.thread_ranks import ThreadGroup, on_every_rank

from ft.kv_backup import BLOCK_TOKENS
from sglang_ft.layers.attention.remainder_attention import RemainderKvPool
from sglang_ft.layers.attention.cyclic_placement import CyclicPlacement
from sglang_ft.layers.attention.hybrid_attention import ADOPT_BLOCK_SLOTS, RemainderPlacement

LAYERS, HEADS, DIM, SLOTS = 2, 1, 4, 64


def placements(size: int, policy: str = "load", stream=None):
    group = ThreadGroup(size)
    req_to_token = torch.zeros((8, 32), dtype=torch.int32)
    ranks = [RemainderPlacement(r, size, policy, RemainderKvPool(LAYERS, HEADS, DIM, SLOTS, SLOTS), req_to_token,
                                heads=(3, 4), stream=stream, all_reduce=group.all_reduce_for(r)) for r in range(size)]
    return ranks, group, req_to_token


def extend_batch(rids, pool_rows, seq_lens, new_counts, out_cache_loc):
    mode = SimpleNamespace(is_extend=lambda: True)
    return SimpleNamespace(forward_mode=mode, rids=rids, extend_seq_lens_cpu=new_counts,
                           seq_lens_cpu=torch.tensor(seq_lens), req_pool_indices=torch.tensor(pool_rows),
                           out_cache_loc=torch.tensor(out_cache_loc))


def on_each(ranks, step):
    return on_every_rank(len(ranks), lambda rank: step(ranks[rank]))


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
    views = on_each(ranks, lambda p: p.batch(batch))
    for placement, view in zip(ranks, views):
        assert placement.holders[10:15].tolist() == [1] * 5  # every rank knows rank 0 holds them
        write_owned(placement, view, lambda s: s)
    assert [len(v.spans) for v in views] == [1, 0, 0] and views[0].rows.tolist() == [0, 1, 2, 3, 4]
    assert group.calls == 0  # nothing to copy

    # request b reuses a's first 4 tokens (a cached prefix) and adds 2; round robin gives it to rank 1
    req_to_token[1, :6] = torch.tensor([10, 11, 12, 13, 20, 21])
    batch = extend_batch(["b"], [1], [6], [2], [20, 21])
    views = on_each(ranks, lambda p: p.batch(batch))
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
    for placement, view in zip(ranks, on_each(ranks, lambda p: p.batch(batch))):
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
    from sglang_ft.layers.attention import remainder_placement
    from sglang_ft.managers import scheduler

    placement = placements(2, "load")[0][0]
    placement.owner_of("queued", 300)
    monkeypatch.setattr(remainder_placement, "_active", placement)
    scheduler.after_release_aborted_request(None, object(), SimpleNamespace(rid="queued",
                                                                            kv=SimpleNamespace(holds_kv=False)))
    assert placement.router.load() == {0: 0, 1: 0}


def cyclic_ranks(size: int, req_to_token: torch.Tensor, slots: int = SLOTS):
    return [CyclicPlacement(r, size, "load", RemainderKvPool(LAYERS, HEADS, DIM, slots, slots), req_to_token,
                            heads=(3, 4)) for r in range(size)]


def decode_batch(rids, pool_rows, seq_lens, out_cache_loc):
    return SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: False), rids=rids,
                           seq_lens_cpu=torch.tensor(seq_lens), req_pool_indices=torch.tensor(pool_rows),
                           out_cache_loc=torch.tensor(out_cache_loc))


def holder_of(placement, slots) -> list[int]:
    return [int(placement.holders[s]).bit_length() - 1 for s in slots]


def test_cyclic_placement_rotates_each_request_over_the_workers_from_the_one_with_fewest_rows():
    req_to_token = torch.zeros((4, 64), dtype=torch.int32)
    ranks = cyclic_ranks(3, req_to_token, slots=128)
    req_to_token[0, :40] = torch.arange(0, 40)  # a: 40 tokens
    req_to_token[1, :10] = torch.arange(40, 50)  # b: 10 tokens
    prefill = extend_batch(["a", "b"], [0, 1], [40, 10], [40, 10], list(range(50)))
    batches = [p.batch(prefill) for p in ranks]
    assert holder_of(ranks[0], range(40)) == [p % 3 for p in range(40)]
    assert holder_of(ranks[0], range(40, 50)) == [(1 + p) % 3 for p in range(10)]  # rows 14, 13, 13: from rank 1
    assert ranks[0].rows_of.tolist() == [17, 17, 16]
    for rank, batch in enumerate(batches):  # each rank writes and attends over exactly the rows it holds
        held = [s for s in range(50) if holder_of(ranks[0], [s])[0] == rank]
        assert batch.written_slots.tolist() == held == ranks[rank].take_written().tolist()  # backed up after the step
        assert sorted(torch.cat([span.slots for span in batch.spans]).tolist()) == held
        assert batch.projected_rows.tolist() == list(range(rank, 50, 3))  # every token projected on one rank
    assert [(s.start, s.count, s.prefix) for s in batches[1].spans] == [(0, 40, 0), (40, 10, 0)]
    assert batches[1].spans[0].positions.tolist() == list(range(1, 40, 3))

    req_to_token[0, 40], req_to_token[1, 10] = 60, 61  # a and b decode one token each, on the next worker
    step = decode_batch(["a", "b"], [0, 1], [41, 11], [60, 61])
    batches = [p.batch(step) for p in ranks]
    assert holder_of(ranks[0], [60, 61]) == [1, 2]
    assert batches[2].written_slots.tolist() == [61] and batches[2].spans == []  # a decode batch: one table
    assert [p.take_written().tolist() for p in ranks] == [[], [60], [61]]
    for rank, batch in enumerate(batches):
        held = [[bool(ranks[0].holders[s] >> rank & 1) for s in req_to_token[row, :n].tolist()] + [False] * (41 - n)
                for row, n in ((0, 41), (1, 11))]
        assert batch.decode_held.tolist() == held
    assert all(torch.equal(p.holders, ranks[0].holders) for p in ranks)  # every rank placed the same
    req_to_token[0, 41] = 62
    alone = [p.batch(decode_batch(["a"], [0], [42], [62])) for p in ranks]
    assert [b.projected_rows.tolist() for b in alone] == [[0], [], []]  # fewer tokens than ranks

    req_to_token[2, :20] = req_to_token[0, :20]  # c reuses a's first 20 cached tokens, then 5 new ones
    req_to_token[2, 20:25] = torch.arange(70, 75)
    assert ranks[0].rows_of.tolist() == [17, 18, 18]  # 17, 17, 16 and the three decoded tokens on workers 1, 2, 2
    [p.batch(extend_batch(["c"], [2], [25], [5], list(range(70, 75)))) for p in ranks]
    assert holder_of(ranks[0], range(70, 75)) == [0, 1, 2, 0, 1]  # from the fewest rows, not on from a's position 19

    before = ranks[0].rows_of.clone()
    ranks[0].release_slots(torch.arange(0, 9))
    assert (before - ranks[0].rows_of).tolist() == [3, 3, 3]  # a freed slot's rows leave its holder's count


def test_cyclic_placement_keeps_a_mixed_workload_within_one_block_per_worker():
    """Prompts of mixed lengths prefilled, then decoded with requests finishing at different times: after every
    step the workers' remainder rows differ by less than one block (16 tokens)."""
    torch.manual_seed(0)
    size, requests = 3, 24
    req_to_token = torch.zeros((requests, 200), dtype=torch.int32)
    placement = cyclic_ranks(size, req_to_token, slots=requests * 200)[0]
    lengths = torch.randint(5, 120, (requests,)).tolist()
    to_generate = torch.randint(1, 60, (requests,)).tolist()
    for i, n in enumerate(lengths):
        req_to_token[i, :200] = torch.arange(i * 200, (i + 1) * 200)
        placement.batch(extend_batch([str(i)], [i], [n], [n], list(range(i * 200, i * 200 + n))))
    spread = []
    for step in range(max(to_generate)):
        live = [i for i in range(requests) if step < to_generate[i]]
        seq = [lengths[i] + step + 1 for i in live]
        placement.batch(decode_batch([str(i) for i in live], live, seq, [i * 200 + n - 1 for i, n in zip(live, seq)]))
        for i in range(requests):
            if step + 1 == to_generate[i]:  # finished: SGLang frees its slots
                placement.release_slots(torch.arange(i * 200, i * 200 + lengths[i] + to_generate[i]))
        rows = placement.rows_of
        spread.append(int(rows.max() - rows.min()))
        assert rows.tolist() == [int((placement.holders >> w & 1).sum()) for w in range(size)]
    assert max(spread) < BLOCK_TOKENS, spread


def test_cyclic_placement_keeps_requests_sharing_a_cached_prefix_within_one_block():
    """Requests that reuse one cached system prompt, each with its own suffix and output length: the workers' rows
    stay within one block. Each request's new rows start on the worker with the fewest; going on from the holder
    of the prefix's last token started all of them on one worker (a server's mixed workload: 30 rows apart)."""
    torch.manual_seed(1)
    size, requests, shared = 3, 24, 30
    req_to_token = torch.zeros((requests + 1, 200), dtype=torch.int32)
    placement = cyclic_ranks(size, req_to_token, slots=(requests + 1) * 200)[0]
    req_to_token[requests, :shared] = torch.arange(shared)  # the system prompt, cached by a first request
    placement.batch(extend_batch(["system"], [requests], [shared], [shared], list(range(shared))))
    suffixes = torch.randint(3, 20, (requests,)).tolist()
    to_generate = torch.randint(1, 60, (requests,)).tolist()
    base = lambda i: 200 * (i + 1)  # noqa: E731  (slot numbers of request i's own tokens)
    for i, n in enumerate(suffixes):
        req_to_token[i, :shared] = torch.arange(shared)
        req_to_token[i, shared:200] = torch.arange(base(i), base(i) + 200 - shared)
        placement.batch(extend_batch([str(i)], [i], [shared + n], [n], list(range(base(i), base(i) + n))))
    spread = []
    for step in range(max(to_generate)):
        live = [i for i in range(requests) if step < to_generate[i]]
        seq = [shared + suffixes[i] + step + 1 for i in live]
        placement.batch(decode_batch([str(i) for i in live], live, seq,
                                     [base(i) + n - shared - 1 for i, n in zip(live, seq)]))
        rows = placement.rows_of
        spread.append(int(rows.max() - rows.min()))
        assert rows.tolist() == [int((placement.holders >> w & 1).sum()) for w in range(size)]
    assert max(spread) < BLOCK_TOKENS, spread


def test_cyclic_placement_after_a_regroup_spreads_every_cached_slot_in_blocks():
    ranks = cyclic_ranks(3, torch.zeros((1, 1), dtype=torch.int32), slots=2 * SLOTS)
    live = torch.arange(1, 50)
    resumed = [SimpleNamespace(rid="r", slots=list(range(1, 41)), prompt_len=30, max_new_tokens=20)]
    for p in ranks:
        p.adopt(resumed, live, lambda heads, slots: None)
    assert ranks[0].router.owner_of == {}  # no owners under cyclic placement
    assert ranks[0].rows_of.tolist() == [17, 16, 16] and all(torch.equal(p.holders, ranks[0].holders) for p in ranks)
    assert holder_of(ranks[0], range(1, 7)) == [0, 1, 2, 0, 1, 2]  # dealt in turn


def test_cyclic_pools_hold_a_share_each_and_together_every_slot():
    assert CyclicPlacement.pool_rows(65536, 3) == 21846 + 2731  # a third plus an eighth of it
    assert CyclicPlacement.pool_rows(10, 1) == 10 and RemainderPlacement.pool_rows(65536, 3) == 65536
    for slots, workers in ((65536, 3), (100, 7), (17, 5), (4096, 31)):
        assert workers * CyclicPlacement.pool_rows(slots, workers) >= slots


def test_a_full_pool_is_passed_over_and_the_rotation_goes_on_where_there_is_room():
    req_to_token = torch.zeros((3, 16), dtype=torch.int32)
    ranks = [CyclicPlacement(r, 3, "load", RemainderKvPool(LAYERS, HEADS, DIM, 64, 4), req_to_token, heads=(3, 4))
             for r in range(3)]
    req_to_token[0, :6] = torch.arange(0, 6)
    [p.batch(extend_batch(["a"], [0], [6], [6], list(range(6)))) for p in ranks]  # 2 rows each, pools of 4
    for p in ranks:
        p.rows_of[0] = 4  # rank 0's pool is full
    req_to_token[1, :2], req_to_token[1, 2:6] = torch.tensor([0, 1]), torch.arange(20, 24)
    [p.batch(extend_batch(["b"], [1], [6], [4], list(range(20, 24)))) for p in ranks]  # a's 2 tokens cached
    assert holder_of(ranks[0], range(20, 24)) == [1, 2, 1, 2]  # from rank 1 (fewest rows, 2 = 2), past rank 0
    assert ranks[0].rows_of.tolist() == [4, 4, 4]
    req_to_token[2, :1] = torch.tensor([40])
    with pytest.raises(RuntimeError, match="every worker's remainder KV pool is full"):
        ranks[0].batch(extend_batch(["c"], [2], [1], [1], [40]))


def test_a_step_leaves_the_slots_whose_remainder_rows_this_rank_wrote_for_the_backup_once():
    """The backup copies remainder rows after the step (kv_backup_stream.after_step), from what the placement says
    this rank wrote: the owner's new slots, nothing on the others."""
    ranks = two_ranks_after_one_prefill(None)
    assert ranks[0].take_written().tolist() == [5, 6, 7] and ranks[1].take_written().tolist() == []
    assert ranks[0].take_written() is None  # taken once: an idle step backs up nothing again
