"""Request reconciliation after a regroup (elastic_tp/received_requests.py), on a one-rank gloo group."""

from types import SimpleNamespace

import pytest
import torch.distributed as dist
from sglang_ft.elastic_tp.received_requests import RequestLedger, reconcile, reconcile_report


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "f"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


ANY_MESSAGE = lambda message: True  # noqa: E731  (the fakes below stand for SGLang's tokenized requests)


class FakeScheduler:
    def __init__(self, rids):
        self.waiting_queue = [SimpleNamespace(rid=r) for r in rids]
        self.last_batch = None  # as SGLang's scheduler before its first batch
        self.processed = []

    def process_input_requests(self, reqs):
        self.processed += reqs


def test_rank0_resends_only_what_nobody_holds_and_nothing_that_finished(one_rank_group):
    ledger = RequestLedger(is_new_request=ANY_MESSAGE)
    ledger.record_processed([SimpleNamespace(rid=r) for r in ("a", "b", "c")])  # c has finished since
    ledger.record_pulled([SimpleNamespace(rid=r) for r in ("b", "c", "d")])  # d was pulled, never processed
    scheduler = FakeScheduler(["a", "b"])
    everyone = [reconcile_report(scheduler, ledger, is_source=True)]
    dropped, resent = reconcile(scheduler, ledger, one_rank_group, everyone, is_source=True)
    assert (dropped, resent) == (0, 1)
    assert [r.rid for r in scheduler.processed] == ["d"]
    assert [r.rid for r in scheduler.waiting_queue] == ["a", "b"]


def test_duplicates_are_dropped_by_rid_but_control_messages_pass():
    ledger = RequestLedger(is_new_request=ANY_MESSAGE)
    ledger.record_processed([SimpleNamespace(rid="x")])
    control = SimpleNamespace()  # e.g. a flush request, no rid
    fresh = ledger.unseen([SimpleNamespace(rid="x"), SimpleNamespace(rid="y"), control])
    assert [getattr(r, "rid", None) for r in fresh] == ["y", None]
    ledger.forget(["x"])
    assert [r.rid for r in ledger.unseen([SimpleNamespace(rid="x")])] == ["x"]


def test_an_abort_naming_a_request_already_processed_is_never_dropped():
    """It carries the rid of a request every rank holds; taking it for a re-send of that request dropped every
    abort under --ft (a hung-up client's request then decoded to its end)."""
    from sglang.srt.managers.io_struct import AbortReq

    ledger = RequestLedger()
    ledger.seen.append("a")
    abort = AbortReq(rid="a")
    assert ledger.unseen([abort]) == [abort]
    ledger.record_processed([abort])
    ledger.record_pulled([abort])
    assert list(ledger.seen) == ["a"] and list(ledger.pulled) == []  # neither recorded as a request


def test_a_joiners_synced_requests_are_held_so_a_journal_resend_of_them_is_dropped():
    """A restarted worker takes rank 0's waiting queue as SGLang `Req`s, not as tokenized messages; when it later
    became rank 0 and the journal re-sent those requests, it kept them twice (a chaos soak: the same rid twice in
    one batch output crashed SGLang's detokenizer and the whole server)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.observability.req_time_stats import SchedulerReqTimeStats
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang_ft.elastic_tp.received_requests import is_new_request

    class Resend(SimpleNamespace):  # stands for the journal's TokenizedGenerateReqInput
        pass

    held = [Req(rid, "", array("q", [1, 2]), SamplingParams(max_new_tokens=4), time_stats=SchedulerReqTimeStats())
            for rid in ("a", "b")]
    resend = [Resend(rid=rid) for rid in ("a", "b", "c")]
    ledger = RequestLedger(is_new_request=lambda m: isinstance(m, Resend) or is_new_request(m))  # real for `Req`
    ledger.record_processed(held)  # what the joiner did before: a `Req` is no request message, nothing recorded
    assert [m.rid for m in ledger.unseen(resend)] == ["a", "b", "c"]
    ledger.record_held(held)
    assert [m.rid for m in ledger.unseen(resend)] == ["c"]


def test_a_request_still_held_is_never_taken_twice_even_past_the_bounded_history():
    from sglang_ft.elastic_tp.received_requests import held_rids

    scheduler = FakeScheduler(["w"])
    scheduler.running_batch = SimpleNamespace(reqs=[SimpleNamespace(rid="r")])
    scheduler.chunked_req = SimpleNamespace(rid="c")
    assert held_rids(scheduler) == {"w", "r", "c"}
    ledger = RequestLedger(is_new_request=ANY_MESSAGE)  # a fresh history: none of them recorded
    resend = [SimpleNamespace(rid=rid) for rid in ("w", "r", "c", "new")]
    assert [m.rid for m in ledger.unseen(resend, held=held_rids(scheduler))] == ["new"]


def test_a_prefilled_request_not_yet_running_counts_as_held():
    """Between a prefill and the next scheduling its requests are in the last batch only: a re-sent copy arriving
    then must be dropped (on 2026-12-03 one ran beside its original and the detokenizer ended the server)."""
    from sglang_ft.elastic_tp.received_requests import held_rids

    def req(rid, finished=False):
        return SimpleNamespace(rid=rid, finished=lambda: finished)

    scheduler = FakeScheduler([])
    scheduler.running_batch = SimpleNamespace(reqs=[])
    scheduler.chunked_req = None
    scheduler.last_batch = SimpleNamespace(reqs=[req("prefilled"), req("done", finished=True)])
    assert held_rids(scheduler) == {"prefilled"}
    ledger = RequestLedger(is_new_request=ANY_MESSAGE)
    resend = [SimpleNamespace(rid=rid) for rid in ("prefilled", "done", "new")]
    assert [m.rid for m in ledger.unseen(resend, held=held_rids(scheduler))] == ["done", "new"]


def test_a_request_arriving_twice_in_one_pull_is_taken_once():
    """A request dispatched to a new rank 0 just before the tokenizer manager re-sends every unfinished request
    comes twice; control messages naming it still pass."""
    ledger = RequestLedger(is_new_request=lambda m: m.kind == "request")
    messages = [SimpleNamespace(rid="x", kind="request"), SimpleNamespace(rid="x", kind="abort"),
                SimpleNamespace(rid="x", kind="request"), SimpleNamespace(rid="y", kind="request")]
    assert [(m.rid, m.kind) for m in ledger.unseen(messages)] == [("x", "request"), ("x", "abort"), ("y", "request")]


def reconcile_on_thread_ranks(monkeypatch, ranks):
    """`reconcile` on each of `ranks` ((waiting rids, processed rids, pulled rids on rank 0 only)) as a thread, its
    collectives in memory; (each rank's (dropped, resent, rids it processed again), collectives after the gather)."""
    from tests.thread_ranks import ThreadGroup, on_every_rank

    import sglang_ft.sglang_surface as surface
    from sglang_ft.distributed import rank_agreement

    group = ThreadGroup(len(ranks))
    monkeypatch.setattr(rank_agreement, "all_gather_object", lambda mine, me: group.gather_for(me)(mine))
    monkeypatch.setattr(surface, "broadcast_pyobj",
                        lambda data, rank, me, src: group.gather_for(me)(data)[src], raising=False)
    monkeypatch.setattr(dist, "get_rank", lambda me: me)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda me: list(range(len(ranks))))

    def one(rank):
        waiting, processed, pulled = ranks[rank]
        ledger = RequestLedger(is_new_request=ANY_MESSAGE)
        ledger.record_processed([SimpleNamespace(rid=r) for r in processed])
        ledger.record_pulled([SimpleNamespace(rid=r) for r in pulled])
        scheduler = FakeScheduler(waiting)
        everyone = group.gather_for(rank)(reconcile_report(scheduler, ledger, is_source=rank == 0))
        dropped, resent = reconcile(scheduler, ledger, rank, everyone, is_source=rank == 0)
        assert [r.rid for r in scheduler.waiting_queue] == [r for r in waiting if all(r in w for w, _, _ in ranks)]
        return dropped, resent, [r.rid for r in scheduler.processed]

    results = on_every_rank(len(ranks), one)
    return results, group.calls - 1


def test_ranks_holding_the_same_requests_reconcile_with_no_collective_past_the_reports(monkeypatch):
    ranks = [(["a", "b"], ["a", "b", "c"], ["a", "b", "c"]), (["a", "b"], ["a", "b", "c"], []),
             (["a", "b"], ["a", "b", "c"], [])]  # c finished everywhere
    assert reconcile_on_thread_ranks(monkeypatch, ranks) == ([(0, 0, [])] * 3, 0)


def test_a_request_one_rank_missed_is_dropped_where_held_and_sent_again_to_all(monkeypatch):
    """The broadcast of new requests was cut short: ranks 0 and 1 queued n, rank 2 never saw it."""
    ranks = [(["a", "n"], ["a", "n"], ["a", "n"]), (["a", "n"], ["a", "n"], []), (["a"], ["a"], [])]
    results, collectives = reconcile_on_thread_ranks(monkeypatch, ranks)
    assert results == [(1, 1, ["n"]), (1, 1, ["n"]), (0, 1, ["n"])]
    assert collectives == 2  # whether any rank ran it, then rank 0's re-send


def test_a_request_rank_zero_never_processed_is_not_sent_again_where_it_ran(monkeypatch):
    """Rank 0 pulled r and x but processed neither; rank 1 processed r, which ran and left the queue (it is not
    sent again: it would run twice); nobody processed x (sent again)."""
    ranks = [(["a"], ["a"], ["a", "r", "x"]), (["a"], ["a", "r"], [])]
    results, collectives = reconcile_on_thread_ranks(monkeypatch, ranks)
    assert results == [(0, 1, ["x"]), (0, 1, ["x"])] and collectives == 2
