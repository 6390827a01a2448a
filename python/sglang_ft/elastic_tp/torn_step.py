"""Finish, on every survivor, a step that only some of them finished.

A step's last collective (the logits all-gather) can complete on some ranks and not on others: the dying rank had
sent its share to some peers before it died. Those ranks sampled the step's tokens, appended them, maybe finished a
request (and, on rank 0, streamed it); the others hold the step as failed. Left so, the ranks' requests differ by a
token and the new group's first batch differs in shape on each rank: a collective mismatch (gloo aborts, NCCL
could silently mix batches).

So before parking, every rank reports each request's output length; ranks behind take the most advanced rank's
tokens of that step (its logprobs too) and run SGLang's own finish check on them, so a request that finished
there finishes here as well: its KV goes to the radix cache as SGLang's finish puts it, and it is streamed (only
rank 0 sends, and a rank 0 that had not finished the step had not sent it). The step's KV was written by every
layer on every rank (the all-gather comes after the last layer), so a finished request caches the same tokens on
every rank; an unfinished one is parked at the group's minimum (park_requests), as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

Gather = Callable[[object], list]  # this rank's object in, every rank's out (all_gather_object)


def _batch_reqs(scheduler, failed_batch) -> list:
    """Every request of the last steps on this rank (finished ones included)."""
    seen = {}
    for batch in (scheduler.last_batch, failed_batch, scheduler.running_batch):
        for req in getattr(batch, "reqs", None) or ():
            seen.setdefault(id(req), req)
    return list(seen.values())


def _lengths(everyone: list, rid: str) -> tuple[int, int, int]:
    """(the source: the lowest rank of those with the longest output, that length, the shortest length)."""
    lengths = [(other[rid], rank) for rank, other in enumerate(everyone) if other and rid in other]
    longest, source = max(lengths, key=lambda x: (x[0], -x[1]))
    return source, longest, min(length for length, _ in lengths)


def behind(everyone: list, mine: dict[str, int] | None) -> dict[str, tuple[int, int]]:
    """{rid: (source rank, its length)} for this rank's requests some rank is ahead on (`everyone`: each rank's
    output lengths by rid, None for a rank that takes no part)."""
    found = {}
    for rid, length in (mine or {}).items():
        source, longest, _ = _lengths(everyone, rid)
        if longest > length:
            found[rid] = (source, longest)
    return found


def tails_to_send(reqs_by_rid: dict, everyone: list, me: int) -> dict[str, dict]:
    """What this rank sends for the requests it is the source of: the tokens past the group's shortest, and (when
    asked for) its logprob fields whole."""
    tails = {}
    for rid, req in reqs_by_rid.items():
        source, longest, shortest = _lengths(everyone, rid)
        if source != me or longest == shortest:
            continue
        tail = {"from": shortest, "tokens": list(req.output_ids[shortest:])}
        if req.return_logprob:
            tail["logprobs"] = {name: value for name, value in vars(req).items() if "logprob" in name}
        tails[rid] = tail
    return tails


def adopt(req, tail: dict) -> None:
    """Take the source's tokens of the step (and logprobs), then SGLang's own finish check."""
    new = tail["tokens"][len(req.output_ids) - tail["from"]:]
    for token in new:
        req.output_ids.append(token)
        if req.grammar is not None:
            req.grammar.accept_token(token)
        req.update_finish_state()
    for name, value in tail.get("logprobs", {}).items():
        setattr(req, name, value)


def output_lengths(scheduler, failed_batch, joining: bool = False) -> dict[str, int] | None:
    """What this rank reports: each request's output length (None for a joiner, which takes no part)."""
    return None if joining else {req.rid: len(req.output_ids) for req in _batch_reqs(scheduler, failed_batch)}


def is_torn(everyone: list) -> bool:
    """Did some rank finish the failed step that another did not (the same answer on every rank)?"""
    return any(behind(everyone, other) for other in everyone)


def complete_torn_step(scheduler, failed_batch, gather: Gather, me: int, joining: bool = False,
                       everyone: list | None = None) -> list:
    """Bring this rank's requests to the most advanced rank's step; returns the requests it advanced here (their
    step completed: its KV is written on every rank). `everyone`: every rank's `output_lengths`, where the caller
    gathered them already (the regroup does, with its other reports); else they are gathered here."""
    reqs_by_rid = {req.rid: req for req in _batch_reqs(scheduler, failed_batch)}
    mine = output_lengths(scheduler, failed_batch, joining)
    if everyone is None:
        everyone = gather(mine)
    if not is_torn(everyone):
        return []  # the usual case: every rank stopped at the same step
    merged: dict[str, dict] = {}
    for tails in gather(None if joining else tails_to_send(reqs_by_rid, everyone, me)):
        merged.update(tails or {})
    advanced = []
    for rid in behind(everyone, mine):
        req = reqs_by_rid[rid]
        if rid in merged and not req.finished():
            adopt(req, merged[rid])
            advanced.append(req)
    finished = [req for req in advanced if req.finished()]
    if finished:
        from sglang_ft.sglang_surface import release_kv_cache

        for req in finished:
            release_kv_cache(req, scheduler.tree_cache, checkpoint=True)  # as SGLang's finish does
        scheduler.output_streamer.stream_output(finished, any(r.return_logprob for r in finished))
    if advanced:
        logger.warning("sglang-ft: the failed step had finished on another rank: %d requests take its tokens here "
                       "(%d of them finish)", len(advanced), len(finished))
    return advanced
