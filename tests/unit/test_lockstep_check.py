"""The regroup's last check (elastic_tp/lockstep_check.py): ranks whose schedulers differ after a regroup flush their
radix caches and take rank 0's queue order, so their first batches agree; ranks that agree change nothing. Two
ranks as threads, each on SGLang's own radix cache, allocator and requests."""

from tests.thread_ranks import ThreadGroup, on_every_rank
from tests.unit.test_scheduler_sync import cache, make_rank, request

from sglang_ft.elastic_tp.lockstep_check import agree_or_flush, fingerprint


def parked_ranks():
    """Two ranks with the same two parked requests and the same cached prefixes (the same allocation history)."""
    ranks = []
    for _ in range(2):
        rank = make_rank()
        cache(rank, [1, 2, 3, 4, 10, 11])
        cache(rank, [1, 2, 3, 4, 20])
        rank.waiting_queue = [request("a", [1, 2, 3, 4], [10, 11, 12]), request("b", [1, 2, 3, 4], [20, 21])]
        ranks.append(rank)
    return ranks


def check_every_rank(ranks):
    """Each rank's answer and the flushes it made (a flush as SGLang's: empty tree, every slot free)."""
    group, flushes = ThreadGroup(len(ranks)), [0] * len(ranks)

    def flush(rank):
        flushes[rank] += 1
        ranks[rank].tree_cache.reset()
        ranks[rank].token_to_kv_pool_allocator.clear()

    answers = on_every_rank(len(ranks), lambda r: agree_or_flush(ranks[r], group.gather_for(r)(fingerprint(ranks[r])),
                                                                lambda: flush(r)))
    return answers, flushes, group.calls


def test_ranks_in_lockstep_change_nothing_after_one_gather():
    ranks = parked_ranks()
    before = [fingerprint(rank) for rank in ranks]
    assert before[0] == before[1] and before[0][0] == (("a", 7, 6), ("b", 6, 5))  # (rid, tokens, cached)
    assert check_every_rank(ranks) == ([False, False], [0, 0], 1)
    assert [fingerprint(rank) for rank in ranks] == before


def test_a_rank_holding_more_of_a_prefix_makes_every_rank_flush():
    """The case a clean run met: one rank's radix cache held a request's prompt tokens the other's did not."""
    ranks = parked_ranks()
    cache(ranks[0], [1, 2, 3, 4, 10, 11, 12])  # rank 0 cached one token more of "a"
    assert fingerprint(ranks[0]) != fingerprint(ranks[1])
    answers, flushes, _ = check_every_rank(ranks)
    assert answers == [True, True] and flushes == [1, 1]
    after = [fingerprint(rank) for rank in ranks]
    assert after[0] == after[1] and after[0][0] == (("a", 7, 0), ("b", 6, 0))  # nothing cached: all recomputed


def test_queues_in_different_orders_end_in_rank_zeros_order():
    ranks = parked_ranks()
    ranks[1].waiting_queue.reverse()
    answers, flushes, _ = check_every_rank(ranks)
    assert answers == [True, True] and flushes == [1, 1]
    assert [[r.rid for r in rank.waiting_queue] for rank in ranks] == [["a", "b"], ["a", "b"]]


def test_only_the_queues_head_is_matched_in_the_radix_cache(monkeypatch):
    """A flood of queued requests must not lengthen the regroup: past the head, a request counts by rid and length."""
    from sglang_ft.elastic_tp import lockstep_check

    rank = parked_ranks()[0]
    matches = []
    match = rank.tree_cache.match_prefix
    monkeypatch.setattr(rank.tree_cache, "match_prefix", lambda params: (matches.append(params), match(params))[1])
    monkeypatch.setattr(lockstep_check, "MATCHED_REQUESTS", 1)
    assert fingerprint(rank)[0] == (("a", 7, 6), ("b", 6, -1)) and len(matches) == 1


def test_the_same_free_slots_in_another_order_make_every_rank_flush():
    """Slot numbers must stay in lockstep, not only their count (the KV backup and restore address rows by slot):
    ranks that freed the same slots in another order would hand them out differently."""
    import torch

    ranks = parked_ranks()
    for rank, order in zip(ranks, ([10, 11, 12], [12, 10, 11])):
        allocator = rank.token_to_kv_pool_allocator
        allocator.free_pages = allocator.free_pages[3:]  # three slots handed out, then freed in `order`
        allocator.free(torch.tensor(order, dtype=torch.int64))
    assert fingerprint(ranks[0])[1][0] == fingerprint(ranks[1])[1][0]  # the same count
    answers, flushes, _ = check_every_rank(ranks)
    assert answers == [True, True] and flushes == [1, 1]
    assert torch.equal(ranks[0].token_to_kv_pool_allocator.free_pages, ranks[1].token_to_kv_pool_allocator.free_pages)


def test_the_log_line_names_what_differs():
    from sglang_ft.elastic_tp.lockstep_check import describe_difference

    ranks = parked_ranks()
    same = fingerprint(ranks[0])
    slots = ranks[1].token_to_kv_pool_allocator
    slots.free_pages = slots.free_pages.flip(0)  # the same free slots, handed out in another order
    assert "unlike" not in describe_difference([same, same])
    assert describe_difference([same, fingerprint(ranks[1])]).endswith("unlike rank 0: free-slot order")
    ranks[1].waiting_queue.reverse()
    assert "unlike rank 0: queue order, free-slot order" in describe_difference([same, fingerprint(ranks[1])])


def test_a_request_only_some_ranks_received_is_left_to_the_reconcile_not_flushed():
    """The broadcast of a new request was cut short by the failure: rank 0 began its prefill (parked with nothing
    kept), rank 1 never saw it. Everything else agrees, so nothing is flushed: the reconcile stage after the KV
    restore drops it and rank 0 sends it again (a stream-stall run's check flushed every parked request for this).
    The same request at another length, or the common requests in another order, still differ."""
    ranks = parked_ranks()
    ranks[0].waiting_queue.insert(1, request("c", [5, 6, 7], []))  # between a and b, on rank 0 only
    assert check_every_rank(ranks)[:2] == ([False, False], [0, 0])
    assert [r.rid for r in ranks[0].waiting_queue] == ["a", "c", "b"]  # the reconcile's to settle, untouched here
    ranks[1].waiting_queue.insert(1, request("c", [5, 6, 7, 8], []))  # both hold it now, at different lengths
    assert check_every_rank(ranks)[:2] == ([True, True], [1, 1])


def test_the_log_line_names_a_request_a_rank_lacks():
    from sglang_ft.elastic_tp.lockstep_check import describe_difference

    ranks = parked_ranks()
    fewer = fingerprint(ranks[1])
    ranks[0].waiting_queue.append(request("c", [5, 6, 7], []))
    assert "unlike rank 0: lacks [('c', 3, 0)]" in describe_difference([fingerprint(ranks[0]), fewer])
