"""Which KV a request keeps when it is parked for a regroup, on SGLang's own `Req` (so a field SGLang renames
fails here, not mid-recovery); the server tests cover the rest."""

from array import array
from types import SimpleNamespace

import pytest

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_ft.elastic_tp.park_requests import committed_kv_len


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


def request(prompt: int, outputs: int, committed: int, protected: int = 0, extend: int = 0):
    """A request as SGLang's scheduler leaves it: `extend` tokens of its prompt in the current prefill step."""
    req = Req("r", "", array("q", [1] * prompt), SamplingParams(max_new_tokens=64))
    req.output_ids = array("q", [2] * outputs)
    req.kv.kv_committed_len, req.kv.cache_protected_len = committed, protected
    req.prefix_len, req.extend_end = committed - extend, committed
    return req


def test_between_steps_every_token_but_the_newest_has_kv():
    req = request(prompt=10, outputs=4, committed=13)
    assert committed_kv_len(req, None) == 13


def test_a_decode_step_that_failed_mid_forward_loses_its_token():
    req = request(prompt=10, outputs=4, committed=14)  # the step had reserved slot 13 for output 4
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=True))
    assert committed_kv_len(req, batch) == 13
    other = request(prompt=10, outputs=4, committed=13)  # not in the failed batch
    assert committed_kv_len(other, batch) == 13


def test_a_prefill_that_failed_keeps_only_its_cached_prefix():
    req = request(prompt=30, outputs=0, committed=30, protected=8, extend=22)
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=False))
    assert committed_kv_len(req, batch) == 8


def test_never_below_the_prefix_the_radix_cache_already_holds():
    req = request(prompt=5, outputs=0, committed=5, protected=4, extend=5)
    batch = SimpleNamespace(reqs=[req], forward_mode=Mode(decode=False))
    assert committed_kv_len(req, batch) == 4


def prefilling(tree, pool, allocator, rid: str, prompt: list[int]):
    """A request in the middle of its first prefill as SGLang's scheduler set it up: its cached prefix matched and
    locked, a request row, slots for the rest of the prompt, every slot allocated and committed."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    params = SamplingParams(max_new_tokens=8)
    params.normalize(None)  # as the tokenizer manager leaves them (its finish checks read the stop lists)
    req = Req(rid, "", array("q", prompt), params)
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt))))
    req.lock, req.last_node = tree.lock(match.last_device_node), match.last_device_node
    (row,) = pool.alloc([req])
    prefix = match.device_prefix_len
    pool.write((row, slice(0, prefix)), tree.path_device_indices(match.last_device_node)[:prefix].to(torch.int32))
    pool.write((row, slice(prefix, len(prompt))), allocator.alloc(len(prompt) - prefix).to(torch.int32))
    req.kv.cache_protected_len = prefix
    req.kv.kv_allocated_len = req.kv.kv_committed_len = len(prompt)
    req.prefix_len, req.extend_end = prefix, len(prompt)
    req.refresh_fill_ids()  # the tokens the step computes, as SGLang's round set-up leaves them
    return req


def outside_a_server(monkeypatch) -> None:
    """SGLang reads two launch settings from its runtime context; outside a server, give them their defaults."""
    import sglang.srt.managers.schedule_batch as schedule_batch
    import sglang.srt.mem_cache.common as mem_cache_common

    for module in (schedule_batch, mem_cache_common):
        monkeypatch.setattr(module, "get_serving", lambda: SimpleNamespace(strip_thinking_cache=False))
        monkeypatch.setattr(module, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))


def make_radix():
    """SGLang's own token allocator, request pool and radix cache, with a 3-token prefix already cached."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    allocator = TokenToKVPoolAllocator(64, torch.float32, "cpu", None, need_sort=False)
    pool = ReqToTokenPool(4, 32, "cpu", False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=pool, token_to_kv_pool_allocator=allocator,
                                      page_size=1))
    tree.insert(InsertParams(key=RadixKey(array("q", [7, 8, 9])), value=allocator.alloc(3)))
    return SimpleNamespace(allocator=allocator, pool=pool, tree=tree)


@pytest.fixture
def radix(monkeypatch):
    outside_a_server(monkeypatch)
    return make_radix()


def test_parking_after_a_failed_first_prefill_frees_all_but_the_cached_prefix(radix):
    """A new request keeps nothing (its row goes back whole); one with a cached prefix keeps exactly that."""
    from sglang_ft.elastic_tp.park_requests import park

    tree, pool, allocator = radix.tree, radix.pool, radix.allocator
    free_before = allocator.available_size()

    new = prefilling(tree, pool, allocator, "new", [1, 2, 3, 4, 5])
    failed = SimpleNamespace(reqs=[new], forward_mode=Mode(decode=False))
    assert committed_kv_len(new, failed) == 0
    assert park(new, 0, tree) == 0
    assert not new.kv.holds_kv and allocator.available_size() == free_before and pool.available_size() == 4

    cached = prefilling(tree, pool, allocator, "cached", [7, 8, 9, 10, 11])
    failed = SimpleNamespace(reqs=[cached], forward_mode=Mode(decode=False))
    assert committed_kv_len(cached, failed) == 3
    assert park(cached, 3, tree) == 0
    assert not cached.kv.holds_kv and allocator.available_size() == free_before and pool.available_size() == 4
    assert tree.total_size() == 3  # only the prefix the tree already had


def test_parking_every_request_frees_in_one_batch_and_queues_them(radix, monkeypatch):
    """Several requests parked at once: the slots they do not keep go back in one merge of the free list (a
    merge per request cost tens of ms on a large pool), and every request waits in the queue again, even beyond
    `--max-queued-requests` (accepted work is never aborted as "queue full")."""
    import sglang_ft.elastic_tp.park_requests as park_requests

    tree, pool, allocator = radix.tree, radix.pool, radix.allocator
    free_before = allocator.available_size()
    reqs = [prefilling(tree, pool, allocator, rid, prompt)
            for rid, prompt in (("a", [1, 2, 3, 4]), ("b", [7, 8, 9, 5, 6]), ("c", [4, 4, 4]))]
    failed = SimpleNamespace(reqs=[reqs[0]], forward_mode=Mode(decode=False))  # "a" loses its whole prefill
    merges = []
    free = allocator.free
    monkeypatch.setattr(allocator, "free", lambda index: (merges.append(allocator.free_group is None), free(index)))
    queued = []

    def add_to_queue(req, is_retracted):  # SGLang aborts instead of queueing beyond --max-queued-requests
        assert is_retracted and scheduler.max_queued_requests is None
        queued.append(req)

    scheduler = SimpleNamespace(max_queued_requests=1, 
        running_batch=SimpleNamespace(reqs=list(reqs[1:]), batch_is_full=True), last_batch=failed,
        cur_batch_for_debug=None, chunked_req=None, waiting_queue=[], tree_cache=tree,
        token_to_kv_pool_allocator=allocator, _add_request_to_queue=add_to_queue)

    parked, kept, recomputed = park_requests.park_every_request(scheduler, failed, gather=lambda mine: [mine])  # one rank

    # a request with no output yet keeps its prompt but the last token (the one its first decode step feeds)
    assert (parked, kept, recomputed) == (3, 0 + 4 + 2, 0)
    assert sorted(r.rid for r in queued) == ["a", "b", "c"] and scheduler.running_batch.reqs == []
    assert scheduler.max_queued_requests == 1  # the bound is back for new requests
    assert merges.count(True) == 1  # the frees were grouped and merged once
    assert allocator.free_group is None
    # "a" gave everything back; "b" and "c" are in the radix cache now (with the old prefix: 3 + 1 + 2 tokens)
    assert allocator.available_size() == free_before - 3 and tree.total_size() == 6


def scheduler_over(radix, running=(), last_batch=None):
    """The scheduler fields parking reads and writes, over SGLang's own cache structures."""
    scheduler = SimpleNamespace(max_queued_requests=None, running_batch=SimpleNamespace(reqs=list(running),
                                batch_is_full=False), last_batch=last_batch, cur_batch_for_debug=None,
                                chunked_req=None, waiting_queue=[], tree_cache=radix.tree,
                                token_to_kv_pool_allocator=radix.allocator, output_streamer=None, page_size=1)
    scheduler._add_request_to_queue = lambda req, is_retracted: scheduler.waiting_queue.append(req)
    return scheduler


def test_a_prefill_torn_between_ranks_leaves_every_ranks_radix_cache_the_same(monkeypatch):
    """Rank 0 finished a prefill step (sampled its token and, as SGLang does, put the prompt in its radix cache);
    rank 1 failed inside the step's last collective. Rank 1 takes the token (torn_step) and the step counts as
    completed on both, so both keep the whole prompt: parking at rank 1's failed-step length instead left rank 0's
    tree 3 tokens longer (a clean run's first batch after the regroup then differed in size between ranks and gloo
    aborted one). Two ranks as threads, each on SGLang's own structures, through the regroup's two calls."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.common import checkpoint_kv_cache
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from tests.thread_ranks import ThreadGroup, on_every_rank

    import sglang_ft.elastic_tp.park_requests as park_requests
    from sglang_ft.elastic_tp.torn_step import complete_torn_step

    outside_a_server(monkeypatch)
    prompt = [7, 8, 9, 10, 11, 12]  # 3 tokens cached before, 3 prefilled by the torn step
    ranks = [make_radix() for _ in range(2)]
    reqs = [prefilling(r.tree, r.pool, r.allocator, "x", prompt) for r in ranks]
    steps = [SimpleNamespace(reqs=[req], forward_mode=Mode(decode=False)) for req in reqs]
    reqs[0].output_ids.append(42)  # rank 0 processed the step's result
    reqs[0].update_finish_state()
    checkpoint_kv_cache(reqs[0], ranks[0].tree)
    assert reqs[0].kv.cache_protected_len == len(prompt) and reqs[1].kv.cache_protected_len == 3
    schedulers = [scheduler_over(ranks[0], last_batch=steps[0]), scheduler_over(ranks[1])]
    failed = [None, steps[1]]
    group = ThreadGroup(2)

    def regroup_stages(rank):
        gather = group.gather_for(rank)
        advanced = complete_torn_step(schedulers[rank], failed[rank], gather, rank)
        return park_requests.park_every_request(schedulers[rank], failed[rank], gather,
                                                completed_elsewhere=advanced)

    results = on_every_rank(2, regroup_stages)
    assert results[0] == results[1] == (1, len(prompt), 0)  # one request, its prompt kept, nothing to recompute
    assert [list(r.output_ids) for r in reqs] == [[42], [42]]
    for rank, scheduler in zip(ranks, schedulers):
        match = rank.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt + [42]))))
        assert match.device_prefix_len == len(prompt)
        assert [r.rid for r in scheduler.waiting_queue] == ["x"]
    assert ranks[0].allocator.available_size() == ranks[1].allocator.available_size()
    assert ranks[0].tree.total_size() == ranks[1].tree.total_size() == len(prompt)


def decoding(tree, pool, allocator, rid: str, prompt: list[int]):
    """A request between decode steps: its prompt prefilled, one output token sampled (it has no KV yet)."""
    req = prefilling(tree, pool, allocator, rid, prompt)
    req.output_ids.append(42)
    return req


def begin_decode_step(allocator, pool, req) -> None:
    """SGLang's decode set-up for `req`: a slot for its newest token, allocated and committed."""
    import torch

    position = req.kv.kv_allocated_len
    pool.write((req.kv.req_pool_idx, slice(position, position + 1)), allocator.alloc(1).to(torch.int32))
    req.kv.kv_allocated_len = req.kv.kv_committed_len = position + 1


def test_a_decode_step_one_rank_had_begun_leaves_every_ranks_free_slots_in_the_same_order(monkeypatch):
    """Rank 1 received the step's new requests and began the decode step (a slot per request from the head of its
    free list) before the failure; rank 0 failed in that broadcast and took none. Both keep the same KV and the
    same set of free slots; parking gives rank 1's slots back at the tail of its list, so the next allocations
    differed between ranks (the KV backup addresses rows by slot), a CI run's lockstep check caught it and flushed
    every cached prefix. After parking both lists are in the same order and the lockstep check finds no difference
    (it did before the sort)."""
    from tests.thread_ranks import ThreadGroup, on_every_rank

    import sglang_ft.elastic_tp.park_requests as park_requests
    from sglang_ft.elastic_tp.lockstep_check import agree_or_flush, fingerprint, free_slots_digest

    outside_a_server(monkeypatch)
    ranks = [make_radix() for _ in range(2)]
    reqs = [[decoding(r.tree, r.pool, r.allocator, rid, prompt)
             for rid, prompt in (("a", [1, 2, 3, 4]), ("b", [7, 8, 9, 5, 6]))] for r in ranks]
    for req in reqs[1]:
        begin_decode_step(ranks[1].allocator, ranks[1].pool, req)
    step = SimpleNamespace(reqs=reqs[1], forward_mode=Mode(decode=True))
    schedulers = [scheduler_over(r, running=rank_reqs) for r, rank_reqs in zip(ranks, reqs)]
    failed = [None, step]
    group = ThreadGroup(2)

    def regroup_stages(rank):
        gather = group.gather_for(rank)
        parked = park_requests.park_every_request(schedulers[rank], failed[rank], gather)
        flushed = agree_or_flush(schedulers[rank], gather(fingerprint(schedulers[rank])), lambda: None)
        return parked, flushed

    results = on_every_rank(2, regroup_stages)
    assert results[0] == results[1] == ((2, 4 + 5, 0), False)  # every prompt kept, nothing differed
    assert free_slots_digest(ranks[0].allocator) == free_slots_digest(ranks[1].allocator)
    assert ranks[0].allocator.alloc(3).tolist() == ranks[1].allocator.alloc(3).tolist()
