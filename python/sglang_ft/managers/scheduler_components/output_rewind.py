"""Re-send the tokens a dying TP rank 0 computed but never sent.

Every rank runs SGLang's output streamer after a step and advances each request's send offsets; only rank 0 really
sends. If rank 0 dies between finishing a step and its send reaching the detokenizer, the survivors believe those
tokens were delivered, and the new rank 0 would stream on from past them: each stream would miss a token (and a
request that finished in that step would never finish for its client).

So after electing a new rank 0, the tokenizer manager's journal sends it `ReceivedTokens`: for every unfinished
request, how many output tokens it has received. The new rank 0 waits for that message before its first step (a
bounded wait, taken only when it holds output it may not have delivered), broadcasts it like any request, and every
rank rewinds its send offsets to what was received, so the next output re-sends exactly what was lost. A request that
finished in the lost step is kept for a while (`FinishedRequests`) and streamed again from there.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from sglang_ft.elastic_tp.received_requests import held_requests
from sglang_ft.managers.io_struct import ReceivedTokens, split_received_tokens

logger = logging.getLogger(__name__)
KEEP_FINISHED = 1024  # requests that finished recently, per rank
RECENT_FINISH_S = 10.0  # a finish this recent may have been in a step a dying rank 0 did not send
MAX_WAIT_S = 1.0  # the other ranks wait meanwhile in the request broadcast: keep well inside its timeout (2 s)


class FinishedRequests:
    """The last requests that finished on this rank, by rid (bounded), with when they finished."""

    def __init__(self, capacity: int = KEEP_FINISHED):
        self.capacity = capacity
        self.by_rid: OrderedDict[str, tuple[object, float]] = OrderedDict()

    def record(self, reqs) -> None:
        now = time.monotonic()
        for req in reqs:
            if getattr(req, "finished_output", False) and req.rid not in self.by_rid:
                self.by_rid[req.rid] = (req, now)
                if len(self.by_rid) > self.capacity:
                    self.by_rid.popitem(last=False)

    def pop(self, rid: str):
        entry = self.by_rid.pop(rid, None)
        return entry[0] if entry is not None else None

    def any_since(self, seconds: float) -> bool:
        return bool(self.by_rid) and next(reversed(self.by_rid.values()))[1] > time.monotonic() - seconds


def may_hold_undelivered_output(scheduler, finished: FinishedRequests) -> bool:
    """Could the last step of a dead rank 0 have carried output of what this rank holds? Only then is it worth
    waiting for the tokenizer manager's counts before the first step."""
    return finished.any_since(RECENT_FINISH_S) or any(r.send_token_offset > 0
                                                      for r in held_requests(scheduler).values())


def rewind_sent_offsets(req, received: int) -> int:
    """Make `req` stream again from its `received`-th output token; returns how many tokens will be re-sent.

    SGLang's streamer advances the token and the decode-id offsets together (its first send carries a fixed prefix
    of prompt ids before the output ids, so nothing sent means offset 0 for both), and the output-logprob offset to
    the same token count."""
    back = req.send_token_offset - received
    if back <= 0:
        return 0
    req.send_token_offset = received
    req.send_decode_id_offset = req.send_decode_id_offset - back if received > 0 else 0
    if req.return_logprob:
        req.send_output_token_logprobs_offset = min(req.send_output_token_logprobs_offset, received)
        if received == 0:
            req.input_logprob_sent = False
    return back


def apply_received_tokens(scheduler, finished: FinishedRequests, message: ReceivedTokens) -> tuple[int, int]:
    """Rewind every held request the tokenizer manager is behind on, and stream again the recently finished ones it
    never saw finish; returns (requests rewound, finished requests streamed again). Run on every rank alike."""
    held, rewound, restreamed = held_requests(scheduler), 0, 0
    for rid, received in message.received.items():
        req = held.get(rid)
        if req is not None:
            rewound += rewind_sent_offsets(req, received) > 0
            continue
        req = finished.pop(rid)
        if req is not None and rewind_sent_offsets(req, received) > 0:
            req.finished_output = False
            scheduler.output_streamer.stream_output([req], req.return_logprob)
            restreamed += 1
    if rewound or restreamed:
        logger.warning("sglang-ft: the old rank 0 died before sending its last output: %d requests rewound, %d "
                       "finished requests streamed again (epoch %d)", rewound, restreamed, message.epoch)
    return rewound, restreamed


class ReceivedTokensWait:
    """Rank 0's wait, after taking over, for the journal's `ReceivedTokens` of an epoch at least `epoch`."""

    def __init__(self, epoch: int, max_wait_s: float):
        self.epoch = epoch
        self.max_wait_s = max_wait_s
        self.deadline = time.monotonic() + max_wait_s

    def pull_until_counted(self, pull) -> list:
        """Pull (SGLang's non-blocking pull) until the counts arrive or the deadline passes; older counts (a
        snapshot from before output that was streamed since) are dropped, as rewinding to them would duplicate."""
        messages = []
        while True:
            messages += pull() or []
            counts, rest = split_received_tokens(messages)
            fresh = [c for c in counts if c.epoch >= self.epoch]
            if fresh:
                return rest + fresh[-1:]
            if time.monotonic() >= self.deadline:
                logger.warning("sglang-ft: no output counts from the tokenizer manager within %.1fs of epoch %d; "
                               "streaming on without them", self.max_wait_s, self.epoch)
                return rest
            time.sleep(0.002)
