"""A dying TP rank 0's last output, computed on every rank but never sent: rewound and re-sent (output_rewind.py).

These drive SGLang's own stream accumulator on real `Req`s, and check what reaches the "wire" (the chunks SGLang
would hand the detokenizer): after a rewind to what the tokenizer manager received, the chunks concatenate to the
request's full output, with no gap and no duplicate. The end-to-end case is in test_failover.py (the
`kill_unsent` fault on rank 0).
"""

from __future__ import annotations

import time
from array import array
from types import SimpleNamespace

import pytest

from sglang_ft.managers.scheduler_components.output_rewind import (
    FinishedRequests,
    ReceivedTokens,
    ReceivedTokensWait,
    apply_received_tokens,
    may_hold_undelivered_output,
    rewind_sent_offsets,
)

PROMPT = [5, 6, 7, 8, 9, 10]


def make_req(rid: str, stream: bool = True, max_new_tokens: int = 16):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    params.normalize(None)
    return Req(rid, "", array("q", PROMPT), params, stream=stream)


def stream_step(req) -> tuple[list, list] | None:
    """SGLang's streamer on one request after a step: the (output ids, decode ids) it sends, or None."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.output_streamer import _GenerationStreamAccumulator
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    acc = _GenerationStreamAccumulator(
        return_logprob=False, return_hidden_states=False, return_routed_experts=False, return_indexer_topk=False,
        spec_algorithm=SpeculativeAlgorithm.NONE, disaggregation_mode=DisaggregationMode.NULL,
        default_stream_interval=1, default_force_stream_interval=50, get_cached_tokens_details=lambda r: None,
        is_request_level_customized_info_key=lambda k: False, current_weight_version=None)
    acc.accept(req=req)
    return (list(acc.output_ids[0]), list(acc.decode_ids_list[0])) if acc.rids else None


def decode(req, tokens: list[int], wire: list) -> None:
    for token in tokens:
        req.output_ids.append(token)
        req.update_finish_state()
        sent = stream_step(req)
        if sent is not None:
            wire.append(sent)


@pytest.mark.parametrize("delivered_steps", [0, 1, 3])
def test_after_a_rewind_the_stream_has_every_token_once(delivered_steps):
    req = make_req("r")
    wire: list = []
    decode(req, list(range(11, 12 + delivered_steps)), wire)
    delivered, lost = wire[:delivered_steps], wire[delivered_steps:]  # rank 0 died before sending the last step
    assert len(lost) == 1
    received = sum(len(ids) for ids, _ in delivered)
    assert rewind_sent_offsets(req, received) == 1
    decode(req, [14, 15], delivered)  # the new rank 0 streams on
    assert sum((ids for ids, _ in delivered), []) == list(req.output_ids)
    # the detokenizer's ids: the prompt's tail (its first chunk), then every output id once
    decode_ids = sum((d for _, d in delivered), [])
    assert decode_ids == list(req.surr_and_decode_ids) and decode_ids[-len(req.output_ids):] == list(req.output_ids)


def test_a_rewind_to_what_was_sent_changes_nothing():
    req = make_req("r")
    wire: list = []
    decode(req, [11, 12], wire)
    before = (req.send_token_offset, req.send_decode_id_offset)
    assert rewind_sent_offsets(req, 2) == 0 and rewind_sent_offsets(req, 5) == 0
    assert (req.send_token_offset, req.send_decode_id_offset) == before


class FakeStreamer:
    def __init__(self):
        self.wire: list = []

    def stream_output(self, reqs, return_logprob):
        for req in reqs:
            sent = stream_step(req)
            if sent is not None:
                self.wire.append((req.rid, sent[0]))


def fake_scheduler(waiting=(), running=()):
    return SimpleNamespace(waiting_queue=list(waiting), running_batch=SimpleNamespace(reqs=list(running)),
                           chunked_req=None, last_batch=None, output_streamer=FakeStreamer())


def test_held_requests_are_rewound_and_a_finished_one_is_streamed_again():
    running, waiting, done, other = make_req("running"), make_req("waiting"), make_req("done", max_new_tokens=2), \
        make_req("other")
    for req, tokens in ((running, [1, 2, 3]), (waiting, [4, 5]), (done, [6, 7]), (other, [8])):
        decode(req, tokens, [])
    assert done.finished() and done.finished_output
    finished = FinishedRequests()
    finished.record([running, done])  # only the finished one is kept
    scheduler = fake_scheduler(waiting=[waiting], running=[running])
    assert may_hold_undelivered_output(scheduler, finished)

    counts = ReceivedTokens(epoch=2, received={"running": 2, "waiting": 2, "done": 1, "unknown": 0})
    assert apply_received_tokens(scheduler, finished, counts) == (1, 1)
    assert running.send_token_offset == 2 and waiting.send_token_offset == 2
    assert scheduler.output_streamer.wire == [("done", [7])]  # its last token and its end, sent again
    assert done.finished_output and finished.pop("done") is None  # streamed once, not kept for another time
    assert other.send_token_offset == 1  # not named by the counts: untouched


def test_nothing_to_wait_for_without_output_sent_or_a_recent_finish():
    finished = FinishedRequests()
    fresh = make_req("fresh")  # queued, never streamed
    assert not may_hold_undelivered_output(fake_scheduler(waiting=[fresh]), finished)
    done = make_req("done", max_new_tokens=1)
    decode(done, [3], [])
    finished.record([done])
    assert may_hold_undelivered_output(fake_scheduler(), finished)
    finished.by_rid["done"] = (done, time.monotonic() - 60)  # finished long before the failure
    assert not may_hold_undelivered_output(fake_scheduler(), finished)


def test_finished_requests_are_bounded():
    finished = FinishedRequests(capacity=3)
    reqs = [SimpleNamespace(rid=f"r{i}", finished_output=True) for i in range(5)]
    finished.record(reqs + [SimpleNamespace(rid="running", finished_output=False)])
    assert list(finished.by_rid) == ["r2", "r3", "r4"]


def test_the_wait_keeps_pulling_until_fresh_counts_and_drops_stale_ones():
    batches = [["a"], [], [ReceivedTokens(1, {"x": 1}), "b"], [ReceivedTokens(4, {"x": 3})], ["c"]]
    wait = ReceivedTokensWait(epoch=4, max_wait_s=5)
    got = wait.pull_until_counted(lambda: batches.pop(0) if batches else [])
    assert got == ["a", "b", ReceivedTokens(4, {"x": 3})] and batches == [["c"]]


def test_the_wait_is_bounded():
    wait = ReceivedTokensWait(epoch=4, max_wait_s=0.05)
    started = time.monotonic()
    got = wait.pull_until_counted(lambda: ["a", ReceivedTokens(3, {})])  # only stale counts ever come
    assert 0.05 <= time.monotonic() - started < 1
    assert got and set(got) == {"a"}  # everything pulled kept, the stale counts dropped
