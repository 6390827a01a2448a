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

    req = Req(rid, "", array("q", prompt), SamplingParams(max_new_tokens=8))
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt))))
    req.lock, req.last_node = tree.lock(match.last_device_node), match.last_device_node
    (row,) = pool.alloc([req])
    prefix = match.device_prefix_len
    pool.write((row, slice(0, prefix)), tree.path_device_indices(match.last_device_node)[:prefix].to(torch.int32))
    pool.write((row, slice(prefix, len(prompt))), allocator.alloc(len(prompt) - prefix).to(torch.int32))
    req.kv.cache_protected_len = prefix
    req.kv.kv_allocated_len = req.kv.kv_committed_len = len(prompt)
    req.prefix_len, req.extend_end = prefix, len(prompt)
    return req


@pytest.fixture
def radix(monkeypatch):
    """SGLang's own token allocator, request pool and radix cache, with a 3-token prefix already cached."""
    import sglang.srt.managers.schedule_batch as schedule_batch
    import sglang.srt.mem_cache.common as mem_cache_common
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    # SGLang reads two launch settings from its runtime context; outside a server, give them their defaults
    for module in (schedule_batch, mem_cache_common):
        monkeypatch.setattr(module, "get_serving", lambda: SimpleNamespace(strip_thinking_cache=False))
        monkeypatch.setattr(module, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
    allocator = TokenToKVPoolAllocator(64, torch.float32, "cpu", None, need_sort=False)
    pool = ReqToTokenPool(4, 32, "cpu", False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=pool, token_to_kv_pool_allocator=allocator,
                                      page_size=1))
    tree.insert(InsertParams(key=RadixKey(array("q", [7, 8, 9])), value=allocator.alloc(3)))
    return SimpleNamespace(allocator=allocator, pool=pool, tree=tree)


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
    monkeypatch.setattr(park_requests, "agree_on_lengths", lambda lengths, group: lengths)  # one rank
    queued = []

    def add_to_queue(req, is_retracted):  # SGLang aborts instead of queueing beyond --max-queued-requests
        assert is_retracted and scheduler.max_queued_requests is None
        queued.append(req)

    scheduler = SimpleNamespace(max_queued_requests=1, 
        running_batch=SimpleNamespace(reqs=list(reqs[1:]), batch_is_full=True), last_batch=failed,
        cur_batch_for_debug=None, chunked_req=None, waiting_queue=[], tree_cache=tree,
        token_to_kv_pool_allocator=allocator, _add_request_to_queue=add_to_queue)

    parked, kept, recomputed = park_requests.park_every_request(scheduler, failed, cpu_group=None)

    # a request with no output yet keeps its prompt but the last token (the one its first decode step feeds)
    assert (parked, kept, recomputed) == (3, 0 + 4 + 2, 0)
    assert sorted(r.rid for r in queued) == ["a", "b", "c"] and scheduler.running_batch.reqs == []
    assert scheduler.max_queued_requests == 1  # the bound is back for new requests
    assert merges.count(True) == 1  # the frees were grouped and merged once
    assert allocator.free_group is None
    # "a" gave everything back; "b" and "c" are in the radix cache now (with the old prefix: 3 + 1 + 2 tokens)
    assert allocator.available_size() == free_before - 3 and tree.total_size() == 6
