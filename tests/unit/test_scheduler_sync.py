"""A restarted worker's scheduler state (`elastic_tp/scheduler_sync.py`) on SGLang's own radix cache, allocator and
requests: every rank that applies rank 0's snapshot ends up identical, whatever it held before."""

import pickle
from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.observability.req_time_stats import SchedulerReqTimeStats
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_ft.elastic_tp.scheduler_sync import apply_snapshot, portable_request, rebuild_request, take_snapshot

SLOTS = 64


class RequestSlots:
    """Stands in for SGLang's ReqToTokenPool: parked requests hold no request slot."""

    size = 8

    def __init__(self):
        self.cleared = 0

    def available_size(self):
        return self.size

    def clear(self):
        self.cleared += 1


def make_rank():
    allocator = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", None, need_sort=False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                                      page_size=1))
    return SimpleNamespace(tree_cache=tree, token_to_kv_pool_allocator=allocator, req_to_token_pool=RequestSlots(),
                           waiting_queue=[], page_size=1, tokenizer=None,
                           new_token_ratio_tracker=SimpleNamespace(current=0.7),
                           metrics_reporter=SimpleNamespace(enable_metrics=False))


def cache(rank, tokens):
    """Give `tokens` KV slots and put them in the radix cache, as a finished or parked request leaves them."""
    key = RadixKey(array("q", tokens))
    prefix = rank.tree_cache.match_prefix(MatchPrefixParams(key=key)).device_prefix_len
    slots = rank.token_to_kv_pool_allocator.alloc(len(tokens) - prefix)
    old = rank.tree_cache.path_device_indices(rank.tree_cache.match_prefix(MatchPrefixParams(key=key)).last_device_node)
    rank.tree_cache.insert(InsertParams(key=key, value=torch.cat([old[:prefix], slots])))


def request(rid, prompt, outputs):
    req = Req(rid, "", array("q", prompt), SamplingParams(max_new_tokens=32), time_stats=SchedulerReqTimeStats())
    req.output_ids = array("q", outputs)
    return req


def slots_of(rank, tokens):
    match = rank.tree_cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    return rank.tree_cache.path_device_indices(match.last_device_node)[: match.device_prefix_len].tolist()


@pytest.fixture
def leader():
    """Rank 0 with two parked requests sharing a prompt prefix and a finished request's cached prefix."""
    rank = make_rank()
    cache(rank, [9, 9, 9, 9, 9])  # a finished request's KV, used by no waiting request
    cache(rank, [1, 2, 3, 4, 10, 11])
    cache(rank, [1, 2, 3, 4, 20])
    rank.waiting_queue = [request("a", [1, 2, 3, 4], [10, 11, 12]), request("b", [1, 2, 3, 4], [20, 21]),
                          request("c", [7, 7], [])]  # c was never prefilled
    rank.new_token_ratio_tracker.current = 0.42
    return rank


def test_survivors_and_joiners_end_identical_to_rank_0(leader):
    snapshot = pickle.loads(pickle.dumps(take_snapshot(leader, with_requests=True)))  # as it travels
    survivor = make_rank()  # same requests, a different allocation history
    cache(survivor, [5, 5, 5])
    cache(survivor, [9, 9, 9, 9, 9])
    cache(survivor, [1, 2, 3, 4, 10, 11])
    cache(survivor, [1, 2, 3, 4, 20])
    survivor.waiting_queue = list(leader.waiting_queue)
    joiner = make_rank()
    expected = {tokens: slots_of(leader, tokens) for tokens in ((1, 2, 3, 4, 10, 11), (1, 2, 3, 4, 20))}

    stats = [apply_snapshot(rank, snapshot, take_requests=rank is joiner) for rank in (leader, survivor, joiner)]
    for rank in (leader, survivor, joiner):
        assert torch.equal(rank.token_to_kv_pool_allocator.free_pages, leader.token_to_kv_pool_allocator.free_pages)
        for tokens, slots in expected.items():
            assert slots_of(rank, tokens) == slots  # slot numbers keep their meaning: survivors' KV stays put
        assert slots_of(rank, (9, 9, 9, 9, 9)) == []  # a prefix no waiting request uses is dropped
        assert rank.new_token_ratio_tracker.current == 0.42 and rank.req_to_token_pool.cleared == 1
    assert stats[0].cached_tokens == 7 and stats[0].sequences == 2 and stats[0].freed_slots == 5
    assert stats[2].freed_slots == 0 and stats[2].requests == 3
    assert leader.token_to_kv_pool_allocator.available_size() == SLOTS - 7


def test_a_joiner_takes_rank_0s_requests_with_their_progress(leader):
    snapshot = pickle.loads(pickle.dumps(take_snapshot(leader, with_requests=True)))
    joiner = make_rank()
    apply_snapshot(joiner, snapshot, take_requests=True)
    for mine, theirs in zip(joiner.waiting_queue, leader.waiting_queue, strict=True):
        assert isinstance(mine, Req) and mine is not theirs
        assert (mine.rid, list(mine.origin_input_ids), list(mine.output_ids)) == \
            (theirs.rid, list(theirs.origin_input_ids), list(theirs.output_ids))
        assert mine.sampling_params.max_new_tokens == 32 and mine.last_node is None
        mine.time_stats.set_forward_entry_time()  # SGLang's scheduler calls this when the request runs


def test_every_request_field_travels_except_process_local_ones(leader):
    state, left_out = portable_request(leader.waiting_queue[0])
    assert left_out == [] and "tokenizer" not in state and "origin_input_ids" in state
    rebuilt = rebuild_request(pickle.loads(pickle.dumps(state)), make_rank())
    assert set(vars(rebuilt)) == set(vars(leader.waiting_queue[0]))


def test_only_the_token_allocator_is_supported(leader):
    snapshot = take_snapshot(leader, with_requests=False)
    paged = make_rank()
    paged.token_to_kv_pool_allocator.page_size = 16
    with pytest.raises(NotImplementedError, match="page-size 1"):
        apply_snapshot(paged, snapshot, take_requests=False)


def test_the_rebuild_drops_from_the_kv_backup_only_what_it_freed(leader):
    """SGLang's radix cache (the unified one it serves with) frees a key's "duplicate" slots on insert; rebuilding
    the tree inserts shared prefixes again with the very slots the tree keeps. Those must not reach the KV backup
    as drops: they did (found by a failure after a rejoin, whose KV restore then missed the shared prompt's rows)."""
    from sglang.srt.mem_cache.unified_radix_cache import ComponentType, UnifiedRadixCache

    from sglang_ft.mem_cache.kv_backup_stream import KvStreamer

    snapshot = take_snapshot(leader, with_requests=True)
    rank = make_rank()
    allocator = rank.token_to_kv_pool_allocator
    rank.tree_cache = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=1,
        tree_components=(ComponentType.FULL,)))
    for tokens in ([9, 9, 9, 9, 9], [1, 2, 3, 4, 10, 11], [1, 2, 3, 4, 20]):
        cache(rank, tokens)
    streamer = KvStreamer("inproc://kv-backup-test", 0, 16, None, allocator, 4)
    streamer.sender.geometry = object()  # streaming
    dropped = []
    streamer.sender.drop = lambda slots, **_: dropped.extend(slots.tolist())
    free = allocator.free
    allocator.free = lambda slots: (free(slots), streamer.on_slots_freed(allocator, slots))  # the plugin's hook

    unused = slots_of(rank, (9, 9, 9, 9, 9))  # no waiting request uses it: really freed

    stats = apply_snapshot(rank, snapshot, take_requests=False, kv_stream=streamer)
    assert stats.freed_slots == 5 and sorted(dropped) == sorted(unused)
    streamer.sender.close()
