"""A step finished on some ranks only (torn_step.py): the ranks behind take its tokens, and its finishes.

Ranks run as threads over an in-memory all-gather, each with SGLang's own `Req`s; the end-to-end case is
`make demo`'s kill (test_ecosystem.py), where a worker died as the last collective of a step had reached some peers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tests.unit.test_output_rewind import FakeStreamer, decode, make_req
from tests.thread_ranks import ThreadGroup, on_every_rank

from sglang_ft.elastic_tp import torn_step
from sglang_ft.elastic_tp.torn_step import complete_torn_step


def run_ranks(schedulers, failed_batches, joining=()):
    group = ThreadGroup(len(schedulers))
    results = on_every_rank(len(schedulers), lambda rank: complete_torn_step(
        schedulers[rank], failed_batches[rank], group.gather_for(rank), rank, joining=rank in joining))
    return [len(advanced) for advanced in results], group.calls


def scheduler_with(last=(), running=()):
    return SimpleNamespace(last_batch=SimpleNamespace(reqs=list(last)), running_batch=SimpleNamespace(reqs=list(running)),
                           tree_cache=object(), output_streamer=FakeStreamer())


@pytest.fixture
def released(monkeypatch):
    import sglang.srt.mem_cache.common as common

    calls = []
    monkeypatch.setattr(common, "release_kv_cache", lambda req, tree, checkpoint: calls.append((req.rid, checkpoint)))
    return calls


def pair(rid: str, tokens: list[int], max_new_tokens: int = 16):
    """The same request on two ranks, both through `tokens`."""
    reqs = [make_req(rid, max_new_tokens=max_new_tokens) for _ in range(2)]
    for req in reqs:
        decode(req, tokens, [])
    return reqs


def test_ranks_that_stopped_at_the_same_step_change_nothing_after_one_gather(released):
    a0, a1 = pair("a", [1, 2])
    results, calls = run_ranks([scheduler_with(running=[a0]), scheduler_with(running=[a1])], [None, None])
    assert results == [0, 0] and calls == 1 and list(a0.output_ids) == [1, 2] and released == []


def test_a_rank_behind_takes_the_steps_tokens_and_finishes_what_finished_ahead(released):
    running0, running1 = pair("running", [1, 2])
    done0, done1 = pair("done", [6], max_new_tokens=2)
    # rank 1 finished the step: it sampled 3 for "running" and 7 for "done", which reached its length and finished
    decode(running1, [3], [])
    decode(done1, [7], [])
    assert done1.finished() and not done0.finished()
    step = SimpleNamespace(reqs=[running0, done0])  # rank 0 holds the same step as failed
    ranks = [scheduler_with(last=[], running=[running0, done0]), scheduler_with(last=[running1, done1])]
    results, calls = run_ranks(ranks, [step, None])
    assert results == [2, 0] and calls == 2
    assert list(running0.output_ids) == [1, 2, 3] and not running0.finished()
    assert list(done0.output_ids) == [6, 7] and done0.finished()
    assert type(done0.finished_reason) is type(done1.finished_reason)  # SGLang's own finish check, here too
    assert released == [("done", True)]  # its KV to the radix cache, as SGLang's finish does
    assert ranks[0].output_streamer.wire == [("done", [7])]  # streamed here (rank 0 had not sent it)
    assert ranks[1].output_streamer.wire == []


def test_logprobs_come_with_the_tokens_and_a_joining_rank_takes_part_without_state(released):
    a0, a1 = pair("a", [4])
    for req in (a0, a1):
        req.return_logprob = True
        req.output_token_logprobs_val = [-0.5]
    decode(a1, [5], [])
    a1.output_token_logprobs_val = [-0.5, -0.25]
    ranks = [scheduler_with(), scheduler_with(running=[a0]), scheduler_with(last=[a1])]
    results, _ = run_ranks(ranks, [None, SimpleNamespace(reqs=[a0]), None], joining=(0,))
    assert results == [0, 1, 0]
    assert list(a0.output_ids) == [4, 5] and a0.output_token_logprobs_val == [-0.5, -0.25]


def test_the_source_is_the_longest_and_the_lowest_rank_among_equals():
    everyone = [{"a": 3, "b": 2}, {"a": 4, "b": 2}, None, {"a": 4}]
    assert torn_step.behind(everyone, everyone[0]) == {"a": (1, 4)}
    assert torn_step.behind(everyone, everyone[1]) == {} and torn_step.behind(everyone, None) == {}
