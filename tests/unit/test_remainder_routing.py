"""Hybrid attention's owners of remainder heads: the split, the three policies, and a regroup."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ft.remainder_routing import BalanceThresholds, RequestRouter, remainder_split


def test_the_split_runs_the_divisible_part_as_tensor_parallel_attention():
    assert remainder_split(8, 3) == (2, 2) and remainder_split(4, 3) == (1, 1) and remainder_split(8, 4) == (2, 0)
    with pytest.raises(ValueError, match="cannot split 2 KV heads over 3 workers"):
        remainder_split(2, 3)


def test_round_robin_takes_turns_whatever_the_load():
    router = RequestRouter((0, 1, 2), "round_robin")
    assert [router.admit(f"r{i}", 1000 if i == 0 else 1) for i in range(5)] == [0, 1, 2, 0, 1]


def test_load_picks_the_fewest_outstanding_tokens_and_follows_progress_and_release():
    router = RequestRouter((0, 1, 2), "load")
    assert [router.admit("a", 100), router.admit("b", 30), router.admit("c", 50)] == [0, 1, 2]
    assert router.admit("d", 10) == 1 and router.load() == {0: 100, 1: 40, 2: 50}
    router.progress("a", 5)  # a generated most of its tokens
    assert router.admit("e", 1) == 0
    router.release("c")
    assert router.choose() == 2 and router.admit("a", 999) == 0  # admitting twice keeps the first owner


def test_prefix_load_stays_with_the_prefix_until_its_owner_is_overloaded():
    router = RequestRouter((0, 1, 2), "prefix_load", BalanceThresholds(absolute_tokens=100, relative=1.5))
    owners = [router.admit(f"shared{i}", 60, prefix_owner=1) for i in range(6)]
    # affinity while worker 1's lead stays within 100 tokens; then the flood spreads to the least loaded
    assert owners[:2] == [1, 1] and set(owners[2:]) >= {0, 2}
    assert router.admit("fresh", 10, prefix_owner=None) == min((0, 1, 2), key=lambda w: (router.load()[w], w))
    assert router.admit("gone", 10, prefix_owner=7) in (0, 1, 2)  # a prefix owner no longer in the group


def test_a_regroup_moves_the_leavers_requests_to_the_least_loaded_survivors():
    router = RequestRouter((0, 1, 2, 3), "load")
    for rid, tokens in [("a", 40), ("b", 30), ("c", 20), ("d", 10), ("e", 25)]:
        router.admit(rid, tokens)
    assert router.owner_of == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 3}
    moved = router.regroup((0, 1, 2))
    assert moved == {"e": 2, "d": 1} and router.load() == {0: 40, 1: 40, 2: 45}  # the larger one first
    with pytest.raises(ValueError):
        router.regroup(())


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="round_robin, load, prefix_load"):
        RequestRouter((0,), "random")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=1, max_size=60), st.integers(1, 5))
def test_load_keeps_every_worker_within_one_request_of_the_least_loaded(sizes, workers):
    """Greedy least-loaded placement: the most loaded worker exceeds the least by at most the largest request."""
    router = RequestRouter(tuple(range(workers)), "load")
    for i, tokens in enumerate(sizes):
        router.admit(str(i), tokens)
    loads = router.load().values()
    assert max(loads) - min(loads) <= max(sizes)


def test_a_regroup_can_place_a_request_on_an_owner_chosen_for_it():
    router = RequestRouter((0, 1, 2), "load")
    router.assign("resumed", 40, 2)
    assert router.owner_of["resumed"] == 2 and router.load() == {0: 0, 1: 0, 2: 40}
    with pytest.raises(ValueError, match="not in the group"):
        router.assign("other", 1, 5)
