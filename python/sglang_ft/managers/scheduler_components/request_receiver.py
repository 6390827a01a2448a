"""Adapter of `sglang.srt.managers.scheduler_components.request_receiver`: rank 0 remembers what it pulled."""

from __future__ import annotations


def around_pull_raw_reqs(original, receiver, *args, **kwargs):
    """Rank 0 remembers what it pulled from the tokenizer manager, to re-send it if a failure interrupts delivery;
    a newly elected rank 0 first waits for the tokenizer manager's output counts (output_rewind.py)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is None:
        return original(receiver, *args, **kwargs)
    from sglang_ft.managers.io_struct import for_replica, split_received_tokens

    def pull():  # SGLang's DP controller hands the journal's messages to every replica: keep this replica's
        return for_replica(original(receiver, *args, **kwargs), worker.dp_rank)

    if worker.counts_wait is not None:
        reqs = worker.counts_wait.pull_until_counted(pull)
        worker.counts_awaited()
    else:  # counts that come when none is awaited are stale: rewinding to them would duplicate output
        reqs = pull()
        reqs = split_received_tokens(reqs)[1] if reqs else reqs
    if reqs:
        worker.ledger.record_pulled(reqs)
    return reqs
