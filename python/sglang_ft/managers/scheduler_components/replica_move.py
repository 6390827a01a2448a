"""A request moved to another data-parallel replica goes on from the output its client already has.

When a replica loses its whole TP group, the tokenizer manager's journal sends each of its unfinished requests to
another replica, preceded by `ResumeTokens`: the output tokens the client has received. The new replica's
scheduler makes the request as SGLang makes any, then `adopt` gives it those tokens as output already produced,
the way SGLang keeps a retracted request's output: its first prefill covers prompt plus output, the next token
follows the last one the client has, and its stream offsets start past what was delivered, so the client
sees every token once, and the detokenizer's state for the rid carries on. With KV backup on, the tokens also
name the slots that held the request's KV in the lost replica, and the new replica takes that KV from its backup
store (`replica_kv.py`), so the prefill computes only the newest token.
"""

from __future__ import annotations

import logging

from sglang_ft.managers.io_struct import ResumeTokens

logger = logging.getLogger(__name__)


def adopt(req, output_ids: list[int]) -> None:
    """Give the new `req` the output its client already has, and start its stream past it (see the offsets of
    SGLang's output streamer: the decode ids sent are a fixed window of prompt ids, then the output ids)."""
    if not output_ids:
        return
    del req.output_ids[:]
    req.output_ids.extend(output_ids)  # SGLang's own container (an int64 array)
    req.is_retracted = True  # SGLang's own state for a request whose output outlived its KV
    decode_ids, _read_offset = req.init_incremental_detokenize()
    req.send_token_offset = len(output_ids)
    req.send_decode_id_offset = len(decode_ids)
    # output logprobs are this request's own (of the tokens it produces): sent from its first, as they are


def adopt_queued(scheduler, resumes: dict[str, ResumeTokens], rid: str, kv_stream=None) -> bool:
    """After SGLang queued request `rid`: adopt it if the journal sent its output ahead of it, and take its KV
    from the lost replica's store if the journal found it there."""
    from sglang_ft.managers.scheduler_components.replica_kv import take_over_kv

    resume = resumes.pop(rid, None)
    if resume is None:
        return False
    for req in reversed(scheduler.waiting_queue):
        if req.rid == rid:
            adopt(req, resume.output_ids)
            kept = take_over_kv(scheduler, req, resume.kv_endpoint, resume.kv_slots, kv_stream) \
                if resume.kv_endpoint else 0
            logger.warning("sglang-ft: request %s moved here from a lost replica, going on after its %d output "
                           "tokens (KV of %d tokens taken over, %d to compute)", rid, len(resume.output_ids), kept,
                           len(req.origin_input_ids) + len(resume.output_ids) - kept)
            return True
    return False
