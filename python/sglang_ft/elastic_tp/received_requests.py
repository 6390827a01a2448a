"""What each scheduler has received, so a regroup can make every rank's request set identical again.

A failure can interrupt the broadcast of newly received requests: some survivors processed them, others not.
Each rank records the rids it processed; rank 0 also keeps the raw requests of its recent pulls. After a regroup
the ranks agree on the requests they all hold, drop the others (none of them ran: running needs every rank), and
rank 0 re-broadcasts any it still has that did not finish anywhere, so nothing accepted is lost.
"""

from __future__ import annotations

from collections import deque

HISTORY = 4096


def is_new_request(message) -> bool:
    """Does `message` start a request? An abort (or another control message) names a request by its rid too, and
    must never be taken for a re-send of that request and dropped."""
    from sglang_ft.sglang_surface import TokenizedEmbeddingReqInput, TokenizedGenerateReqInput

    return isinstance(message, (TokenizedGenerateReqInput, TokenizedEmbeddingReqInput))


class RequestLedger:
    def __init__(self, is_new_request=is_new_request):
        self.is_new_request = is_new_request
        self.seen: deque[str] = deque(maxlen=HISTORY)
        self.pulled: deque = deque(maxlen=HISTORY)  # raw requests rank 0 pulled from the tokenizer manager

    def _requests(self, messages) -> list:
        return [m for m in messages or () if self.is_new_request(m) and isinstance(getattr(m, "rid", None), str)]

    def record_pulled(self, raw_reqs) -> None:
        self.pulled.extend(self._requests(raw_reqs))

    def unseen(self, reqs, held=()) -> list:
        """The messages of `reqs` minus requests this rank has processed before or still holds (`held` rids; the
        history is bounded, a long-running request is not) and minus a second copy of one in `reqs` itself (a
        request dispatched to a new rank 0 just before the tokenizer manager's re-send of every unfinished one
        arrives twice); control messages always pass."""
        seen = set(self.seen).union(held)
        repeats = set()
        for request in self._requests(reqs):
            if request.rid in seen:
                repeats.add(id(request))
            seen.add(request.rid)
        return [r for r in reqs if id(r) not in repeats]

    def forget(self, rids) -> None:
        drop = set(rids)
        kept = [rid for rid in self.seen if rid not in drop]
        self.seen.clear()
        self.seen.extend(kept)

    def record_processed(self, reqs) -> None:
        self.seen.extend(r.rid for r in self._requests(reqs))

    def record_held(self, reqs) -> None:
        """Requests this rank holds without having processed their message: a joiner's copy of rank 0's waiting
        queue (SGLang `Req`s, not tokenized messages), so a journal re-send of them is dropped here too."""
        self.seen.extend(r.rid for r in reqs)


def held_requests(scheduler) -> dict[str, object]:
    """The requests a scheduler holds, by rid: waiting, running, the one being prefilled in chunks, and the
    unfinished ones of its last batch: a prefill batch's requests join the running batch only at the next
    iteration's scheduling, after that iteration's new messages were processed (a re-sent copy arriving then was
    taken as new, ran beside the original, and the detokenizer, meeting one rid twice in an output, ended the
    server)."""
    held = {r.rid: r for r in scheduler.waiting_queue}
    held.update({r.rid: r for r in scheduler.running_batch.reqs})
    if scheduler.last_batch is not None:
        held.update({r.rid: r for r in scheduler.last_batch.reqs if not r.finished()})
    if scheduler.chunked_req is not None:
        held[scheduler.chunked_req.rid] = scheduler.chunked_req
    return held


def held_rids(scheduler) -> set[str]:
    return set(held_requests(scheduler))


def reconcile_report(scheduler, ledger: RequestLedger, is_source: bool) -> tuple[list[str], list[str] | None]:
    """What this rank says for `reconcile`: the rids it has waiting and, on rank 0 (`is_source`), those of the
    requests it pulled that it could send again: still waiting there, or never processed there (one it processed
    and no longer waits on is running or finished). The regroup gathers it with the lockstep check's fingerprint:
    the queues do not change between the two stages (a flush and a cut prefix keep every request)."""
    waiting = [r.rid for r in scheduler.waiting_queue]
    candidates = None
    if is_source:
        queued, seen = set(waiting), set(ledger.seen)
        candidates = list(dict.fromkeys(r.rid for r in ledger.pulled if r.rid in queued or r.rid not in seen))
    return waiting, candidates


def reconcile(scheduler, ledger: RequestLedger, cpu_group, everyone: list, is_source: bool) -> tuple[int, int]:
    """Make every rank's waiting queue the same (`everyone`: each rank's `reconcile_report`, rank 0 first);
    returns (dropped here, re-sent). Collectives only where rank 0 has a request some rank lacks (a failure cut
    the broadcast of new requests short): whether any rank ran it, then rank 0's re-send."""
    import torch.distributed as dist
    from sglang_ft.sglang_surface import broadcast_pyobj, set_waiting_queue

    from sglang_ft.distributed.rank_agreement import all_gather_object

    common = set.intersection(*(set(waiting) for waiting, _ in everyone))
    candidates = [rid for rid in everyone[0][1] or () if rid not in common]
    waiting, seen = {r.rid for r in scheduler.waiting_queue}, set(ledger.seen)
    ran_here = [rid for rid in candidates if rid in seen and rid not in waiting]
    dropped = [r for r in scheduler.waiting_queue if r.rid not in common]
    set_waiting_queue(scheduler, [r for r in scheduler.waiting_queue if r.rid in common])
    ledger.forget(r.rid for r in dropped)  # so a re-send of them is processed here like everywhere else
    if not candidates:
        return len(dropped), 0
    ran = set().union(*all_gather_object(ran_here, cpu_group))
    again = set(candidates) - ran
    if not again:
        return len(dropped), 0
    resend = list({r.rid: r for r in ledger.pulled if r.rid in again}.values()) if is_source else None
    resend = broadcast_pyobj(resend, dist.get_rank(cpu_group), cpu_group, src=dist.get_process_group_ranks(cpu_group)[0])
    if resend:
        scheduler.process_input_requests(resend)
    return len(dropped), len(resend or [])
