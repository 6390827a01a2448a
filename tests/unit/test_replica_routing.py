"""Data-parallel replicas under `--ft --dp-size M`, without a server: the tokenizer-side routing (prefix- and
load-aware, around a lost replica), the journal moving a lost replica's requests, and a moved request going on
from the output its client has on SGLang's own `Req` and stream accumulator."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tests.unit.test_output_rewind import decode, make_req

from sglang_ft.managers.io_struct import ReceivedTokens, RenewReplicaSocket, ResumeTokens, for_replica
from sglang_ft.managers.scheduler_components.replica_move import adopt, adopt_queued
from sglang_ft.managers.tokenizer_manager_components.replica_router import PrefixIndex, ReplicaRouter
from sglang_ft.managers.tokenizer_manager_components.sent_requests import RequestJournal

SHARED = list(range(100, 148))  # three 16-token blocks


def test_the_prefix_index_finds_the_replica_of_the_longest_known_prefix():
    index = PrefixIndex(block=16)
    index.record(SHARED[:32], 0)
    index.record(SHARED + [1, 2, 3], 1)  # the same first blocks, routed later elsewhere: the latest wins
    assert index.owner(SHARED + [9]) == 1
    assert index.owner(SHARED[:15]) is None  # shorter than a block
    assert index.owner([7] + SHARED) is None  # a prefix, not a substring
    index.forget(1)
    assert index.owner(SHARED) is None


def test_the_prefix_index_is_bounded():
    index = PrefixIndex(block=2, capacity=3)
    index.record([1, 2, 3, 4, 5, 6, 7, 8], 0)
    assert len(index.replica_of) == 3
    assert index.owner([1, 2]) is None  # the oldest block went first


def test_prefix_load_follows_the_prefix_until_its_replica_is_overloaded():
    router = ReplicaRouter(2, "prefix_load")
    first = router.route("a", SHARED + [1], tokens=100)
    assert router.route("b", SHARED + [2], tokens=100) == first  # where the prefix went
    assert router.route("c", [9] * 40, tokens=100) != first  # no prefix: the least loaded
    flood = [router.route(f"f{i}", SHARED + [i], tokens=300) for i in range(6)]
    assert set(flood) == {0, 1}  # past the load threshold the flood spreads


def test_load_and_round_robin_policies():
    router = ReplicaRouter(3, "load")
    assert [router.route(r, [1], tokens=t) for r, t in (("a", 50), ("b", 10), ("c", 30), ("d", 5))] == [0, 1, 2, 1]
    turns = ReplicaRouter(2, "round_robin")
    assert [turns.route(str(i), SHARED, tokens=1) for i in range(4)] == [0, 1, 0, 1]


def test_a_clients_own_replica_is_kept_unless_it_is_lost():
    router = ReplicaRouter(2, "load")
    assert router.route("a", [1], tokens=10, wanted=1) == 1
    router.lose(1)
    assert router.route("b", [1], tokens=10, wanted=1) == 0


def test_refresh_releases_finished_requests_and_counts_what_is_left():
    router = ReplicaRouter(2, "load")
    router.route("a", [1] * 10, tokens=40)
    router.route("b", [1] * 10, tokens=40)
    states = {"a": SimpleNamespace(finished=False, output_ids=[0] * 25), "b": SimpleNamespace(finished=True,
                                                                                              output_ids=[])}
    router.refresh(states, force=True)
    assert router.replica_of("b") is None
    assert router.router.load() == {0: 15, 1: 0}


def test_a_lost_replicas_requests_move_to_the_others_and_new_ones_route_around_it():
    router = ReplicaRouter(3, "load")
    for i in range(6):
        router.route(f"r{i}", [i], tokens=10 * (i + 1))
    on_lost = {rid for rid, r in router.router.owner_of.items() if r == 1}
    moved = router.lose(1)
    assert set(moved) == on_lost and set(moved.values()) <= {0, 2}
    assert all(router.route(f"n{i}", [i], tokens=10) != 1 for i in range(5))
    assert router.lose(1) == {}  # reported again: nothing more to move
    assert router.status()["lost"] == [1]


class RecordingTokenizerManager:
    """What the journal uses of SGLang's TokenizerManager, recording what it dispatches."""

    tokenizer_ipc_name = None

    def __init__(self):
        self.rid_to_state: dict[str, SimpleNamespace] = {}
        self.dispatched: list = []

    def _dispatch_to_scheduler(self, obj) -> None:
        from sglang.srt.managers.io_struct import unwrap_from_pickle

        self.dispatched.append(unwrap_from_pickle(obj))  # the journal's own messages travel pickled


def tokenized(rid: str, prompt: list[int], max_new_tokens: int = 16) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, input_ids=prompt, sampling_params=SimpleNamespace(max_new_tokens=max_new_tokens),
                           routed_dp_rank=None)


def journal_over(replicas: int) -> tuple[RequestJournal, RecordingTokenizerManager]:
    journal, manager = RequestJournal(), RecordingTokenizerManager()
    journal.router = ReplicaRouter(replicas, "load")
    journal.loop = asyncio.new_event_loop()  # SGLang's: recording needs it, the tests run their own
    for i in range(6):
        request = tokenized(f"r{i}", [i] * 8)
        manager.rid_to_state[request.rid] = SimpleNamespace(finished=False, output_ids=[])
        journal.record(manager, request)
    manager.dispatched.clear()
    return journal, manager


def test_the_journal_routes_every_request_and_moves_a_lost_replicas_unfinished_ones_with_their_output():
    journal, manager = journal_over(2)
    on_1 = sorted(rid for rid, obj in journal.sent.items() if obj.routed_dp_rank == 1)
    assert on_1 and len(on_1) < 6
    manager.rid_to_state[on_1[0]].output_ids = [41, 42, 43]  # streamed to its client already
    manager.rid_to_state[on_1[-1]].finished = True
    moved = asyncio.run(journal.move_lost_replica(1))
    unfinished = on_1[:-1]
    assert moved == len(unfinished)
    from sglang.srt.managers.io_struct import ActiveRanksOutput

    active, *messages = manager.dispatched  # first, SGLang's DP controller stops routing to the lost replica
    assert isinstance(active, ActiveRanksOutput) and active.status == [True, False]
    resumes = [m for m in messages if isinstance(m, ResumeTokens)]
    requests = [m for m in messages if not isinstance(m, ResumeTokens)]
    assert sorted(r.rid for r in requests) == unfinished and all(r.routed_dp_rank == 0 for r in requests)
    assert [(m.rid, m.output_ids, m.dp_rank) for m in resumes if m.output_ids] == [(on_1[0], [41, 42, 43], 0)]
    for resume in resumes:  # each request's output arrives right before it
        assert manager.dispatched[manager.dispatched.index(resume) + 1].rid == resume.rid
    # no backup store: the prompts' KV and the output's but the newest token's (the next step's) computed again
    assert journal.router.tokens_recomputed == 7 * len(unfinished) + 3
    assert journal.router.status()["moved_requests"] == len(unfinished)
    fresh = tokenized("new", [1] * 8)
    manager.rid_to_state["new"] = SimpleNamespace(finished=False, output_ids=[])
    journal.record(manager, fresh)
    assert fresh.routed_dp_rank == 0


def test_a_rank0_election_in_one_replica_resends_only_its_requests_and_counts_for_it():
    journal, manager = journal_over(2)
    on_0 = {rid for rid, obj in journal.sent.items() if obj.routed_dp_rank == 0}
    asyncio.run(journal.switch_rank0(epoch=2, replica=0))
    renew, *resent, counts = manager.dispatched  # first the DP controller drops the old rank 0's connection
    assert renew == RenewReplicaSocket(0)
    assert sorted(m.rid for m in resent) == sorted(on_0)
    assert counts == ReceivedTokens(2, dict.fromkeys(on_0, 0), dp_rank=0)


def test_each_replica_keeps_only_the_journal_messages_meant_for_it():
    messages = [ReceivedTokens(1, {}, dp_rank=0), ReceivedTokens(1, {}, dp_rank=1), ResumeTokens("a", [1], 1),
                "a request"]
    assert for_replica(messages, 1) == messages[1:]
    assert for_replica(None, 0) is None


def test_a_moved_request_streams_on_after_what_its_client_has():
    """On SGLang's own Req and stream accumulator: a request streams 3 tokens on one replica, which is lost; the
    same request made afresh on another replica adopts them and decodes 2 more. The client's chunks concatenate to
    the 5 tokens once, and the detokenizer's ids to those one request would have sent."""
    first, wire = make_req("r"), []
    decode(first, [11, 12, 13], wire)
    received = sum((ids for ids, _ in wire), [])
    moved = make_req("r")
    adopt(moved, received)
    assert list(moved.output_ids) == [11, 12, 13] and moved.is_retracted
    decode(moved, [14, 15], wire)
    assert sum((ids for ids, _ in wire), []) == [11, 12, 13, 14, 15]
    alone, alone_wire = make_req("r"), []
    decode(alone, [11, 12, 13, 14, 15], alone_wire)
    assert sum((d for _, d in wire), []) == sum((d for _, d in alone_wire), [])


def test_adopt_queued_finds_the_request_sglang_just_queued():
    queued = [make_req("x"), make_req("y")]
    scheduler = SimpleNamespace(waiting_queue=queued)
    resumes = {"y": ResumeTokens("y", [21, 22], 0)}
    assert adopt_queued(scheduler, resumes, "y") and list(queued[1].output_ids) == [21, 22] and resumes == {}
    assert not adopt_queued(scheduler, resumes, "x") and list(queued[0].output_ids) == []


def test_a_replica_outbox_never_blocks_and_delivers_in_order_once_a_peer_connects(tmp_path):
    """SGLang's DP controller's socket to a replica with no rank 0 (electing one, or lost): sends return at once;
    the new rank 0 gets every message in order; a lost replica's messages are dropped."""
    import time

    import zmq

    from sglang_ft.managers.data_parallel_controller_components.replica_outbox import ReplicaOutbox

    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    endpoint = f"ipc://{tmp_path}/replica-1"
    push.bind(endpoint)
    outbox = ReplicaOutbox(push)
    started = time.monotonic()
    for i in range(5):
        outbox.send_pyobj(i)
    assert time.monotonic() - started < 1.0 and len(outbox.pending) == 5
    rank0 = context.socket(zmq.PULL)
    rank0.connect(endpoint)
    deadline = time.monotonic() + 5
    while outbox.pending and time.monotonic() < deadline:
        outbox.flush()
        time.sleep(0.01)
    outbox.send_pyobj(5)
    assert [rank0.recv_pyobj() for _ in range(6)] == list(range(6))
    rank0.close(linger=0)
    assert outbox.discard() == 0
    outbox.send_pyobj(6)
    assert not outbox.pending
    push.close(linger=0)


def test_the_dp_controller_drops_a_lost_replica_from_routing_and_broadcasts():
    from sglang_ft.managers.data_parallel_controller_components.replica_outbox import ReplicaOutbox, drop_inactive

    class Socket:
        def __init__(self):
            self.sent = []

        def send_pyobj(self, obj, flags=0, **kwargs):
            self.sent.append(obj)

    controller = SimpleNamespace(workers=[ReplicaOutbox(Socket()), ReplicaOutbox(Socket())], status=[True, False],
                                 dp_active=[True, True], _active_workers=[0, 1])
    controller._refresh_active_workers = lambda: setattr(
        controller, "_active_workers", [i for i, a in enumerate(controller.dp_active) if a and controller.status[i]])
    drop_inactive(controller)
    assert controller._active_workers == [0]
    controller.workers[1].send_pyobj("abort")
    controller.workers[0].send_pyobj("abort")
    assert controller.workers[1].socket.sent == [] and controller.workers[0].socket.sent == ["abort"]


def test_a_renewed_replica_socket_leaves_a_hung_rank0_out_and_the_new_one_gets_everything(tmp_path):
    """The DP controller's socket to a replica whose old rank 0 is hung (SIGSTOPped, its connection open): before
    the renewal PUSH hands it part of the messages; after it, the new rank 0 gets every one, in order."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import zmq
    from tests.unit.test_request_journal import STALE_RANK0, drain

    from sglang_ft.managers.data_parallel_controller_components.replica_outbox import ReplicaOutbox, renew_on_request

    endpoint = f"ipc://{tmp_path}/replica-0"
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    stale = subprocess.Popen([sys.executable, "-c", STALE_RANK0, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert stale.stdout.readline().strip() == "connected"
        os.kill(stale.pid, signal.SIGSTOP)
        rank0 = context.socket(zmq.PULL)
        rank0.connect(endpoint)
        time.sleep(0.3)
        controller = SimpleNamespace(workers=[ReplicaOutbox(push)])
        for i in range(10):
            controller.workers[0].send_pyobj(f"before-{i}")
        assert 0 < len(drain(rank0, 0.5)) < 10  # the hung peer took its share
        assert renew_on_request(controller, RenewReplicaSocket(0))
        assert not renew_on_request(controller, "an abort")  # SGLang's own messages go on to SGLang
        for i in range(10):
            controller.workers[0].send_pyobj(f"after-{i}")
        got, deadline = [], time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < deadline:  # the new rank 0 reconnects to the fresh socket
            controller.workers[0].flush()
            got += drain(rank0, 0.2)
        assert got == [f"after-{i}" for i in range(10)]
        rank0.close(linger=0)
        controller.workers[0].socket.close(linger=0)
    finally:
        os.kill(stale.pid, signal.SIGKILL)


def test_loads_are_re_read_at_most_every_refresh_interval_unless_forced(monkeypatch):
    from sglang_ft.managers.tokenizer_manager_components import replica_router

    clock = [100.0]
    monkeypatch.setattr(replica_router.time, "monotonic", lambda: clock[0])
    router = ReplicaRouter(2, "load")
    router.route("a", [1] * 10, tokens=40)
    states = {"a": SimpleNamespace(finished=False, output_ids=[])}
    router.refresh(states)
    states["a"].output_ids = [0] * 30
    router.refresh(states)  # within the interval: a burst of arrivals reads no state
    assert router.router.load()[0] == 40
    clock[0] += replica_router.REFRESH_EVERY_S
    router.refresh(states)
    assert router.router.load()[0] == 10
    states["a"].finished = True
    router.refresh(states, force=True)  # a move reads them at once
    assert router.replica_of("a") is None


G_HEADS = 4  # the lost replica's store: test_kv_backup's geometry (2 layers, 4 KV heads, head_dim 3, float32)


def lost_replicas_store(tmp_path, rows: dict[tuple[int, int], list[int]]):
    """A real backup store process loop (a thread) and the lost replica's rank 0 that wrote `rows` into it: per head
    span, the slots written (every layer); returns (fetch endpoint, K and V [layers, slot, head, dim] written)."""
    import os
    import threading

    import numpy as np
    import torch
    from tests.unit.test_kv_backup import G

    from ft.kv_backup import KvBackupSender
    from ft.kv_store import serve

    push, fetch = f"ipc://{tmp_path}/push", f"ipc://{tmp_path}/fetch"
    threading.Thread(target=serve, args=(push, fetch, os.getpid()), daemon=True).start()
    k = torch.randn(G.num_layers, 64, G_HEADS, G.head_dim)
    v = torch.randn(G.num_layers, 64, G_HEADS, G.head_dim)
    lost = KvBackupSender(push, worker=0)
    lost.geometry = G
    for heads, slots in rows.items():
        lost.heads = heads
        for layer in range(G.num_layers):
            lost.write(layer, np.array(slots), k[layer, slots, heads[0]:heads[1]].numpy().view(np.uint32),
                       v[layer, slots, heads[0]:heads[1]].numpy().view(np.uint32))
    wait_for_store(fetch, lost.sent)
    return fetch, k, v


def new_replicas_rank(tree: str, heads: tuple[int, int], group=None):
    """One TP rank of the new replica: SGLang's allocator and radix cache (the unified tree a server uses, or the
    plain one), a KV pool of `heads`."""
    import torch
    from tests.unit.test_kv_backup import G
    from tests.unit.test_scheduler_sync import make_rank

    rank = make_rank()
    if tree == "unified":
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        rank.tree_cache = UnifiedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=rank.token_to_kv_pool_allocator,
            page_size=1, tree_components=(ComponentType.FULL,)))
    width = heads[1] - heads[0]
    pool = SimpleNamespace(k_buffer=[torch.zeros(65, width, G.head_dim) for _ in range(G.num_layers)],
                           v_buffer=[torch.zeros(65, width, G.head_dim) for _ in range(G.num_layers)], start_layer=0)
    rank.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(
        token_to_kv_pool=pool, model=SimpleNamespace(shard=SimpleNamespace(kv_heads=heads))))
    rank.tp_cpu_group = group
    return rank


@pytest.mark.parametrize("tree", ["unified", "radix"])
def test_a_moved_request_takes_its_kv_from_the_lost_replicas_store(tree, tmp_path, monkeypatch):
    """The lost replica's store holds the request's KV (every head) in its old slots; the new replica's rank (heads
    1..3 of 4) gets fresh slots for the tokens it does not cache yet, its heads' rows in them, and prompt plus output
    in its radix cache, so SGLang's prefix match finds them all, and the prefix it already cached keeps its slots
    (the unified tree's insert frees a key's duplicate slots unless told they are its own). Rows missing in the
    store: nothing is kept, nothing leaks, the request is prefilled as any."""
    from array import array

    import torch
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from tests.unit.test_scheduler_sync import cache, request, slots_of

    from sglang_ft.distributed import rank_agreement
    from sglang_ft.managers.scheduler_components import replica_kv

    old_slots = [11, 12, 13, 14, 15]
    fetch, k, v = lost_replicas_store(tmp_path, {(0, G_HEADS): old_slots})
    rank = new_replicas_rank(tree, (1, 3))
    cache(rank, [1, 2])  # the prompt's first tokens are cached here already
    cached = slots_of(rank, [1, 2])
    monkeypatch.setattr(rank_agreement, "any_rank", lambda flag, group: flag)  # one rank: its own answer
    moved = request("m", [1, 2, 3, 4], [])
    adopt(moved, [10, 11])  # the newest output (11) has no KV yet: prompt and 10 do

    free = rank.token_to_kv_pool_allocator.available_size()
    assert replica_kv.take_over_kv(rank, moved, fetch, old_slots) == 5
    slots = slots_of(rank, [1, 2, 3, 4, 10, 11])
    assert len(slots) == 5 and slots[:2] == cached and rank.token_to_kv_pool_allocator.available_size() == free - 3
    pool = rank.tp_worker.model_runner.token_to_kv_pool
    for position in range(2, 5):  # fetched rows: this rank's heads of the old slots
        for layer in range(len(pool.k_buffer)):
            assert torch.equal(pool.k_buffer[layer][slots[position]], k[layer, old_slots[position], 1:3])
            assert torch.equal(pool.v_buffer[layer][slots[position]], v[layer, old_slots[position], 1:3])
    match = rank.tree_cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3, 4, 10, 11]))))
    assert match.device_prefix_len == 5  # SGLang's own match: the prefill computes only token 11

    other = request("o", [7, 8, 9], [])
    adopt(other, [5])
    free = rank.token_to_kv_pool_allocator.available_size()
    assert replica_kv.take_over_kv(rank, other, fetch, [11, 12, 20]) == 0  # slot 20 was never written
    assert rank.token_to_kv_pool_allocator.available_size() == free and slots_of(rank, [7, 8, 9]) == []


def test_the_new_replicas_ranks_keep_the_kv_only_if_every_one_fetched_its_heads(tmp_path, monkeypatch):
    """Two TP ranks (heads 0..2 and 2..4, as threads agreeing over one exchange): a request whose rows the store
    holds for every head is taken over on both, in the same slots; one whose slot lacks rank 1's heads (a step torn
    by the failure) is kept by neither, though rank 0 found all of its own, so their caches stay identical."""
    from tests.unit.test_scheduler_sync import request, slots_of
    from tests.thread_ranks import ThreadGroup, on_every_rank

    from sglang_ft.distributed import rank_agreement
    from sglang_ft.managers.scheduler_components import replica_kv

    fetch, _, _ = lost_replicas_store(tmp_path, {(0, 2): [11, 12, 13, 20], (2, G_HEADS): [11, 12, 13]})
    group = ThreadGroup(2)
    ranks = [new_replicas_rank("unified", heads, group.gather_for(r)) for r, heads in enumerate([(0, 2), (2, 4)])]
    monkeypatch.setattr(rank_agreement, "any_rank", lambda flag, gather: any(gather(flag)))

    def move(rank: int):
        whole, torn = request("w", [1, 2], []), request("t", [5, 6], [])
        adopt(whole, [3, 4])
        adopt(torn, [7])
        taken = (replica_kv.take_over_kv(ranks[rank], whole, fetch, [11, 12, 13]),
                 replica_kv.take_over_kv(ranks[rank], torn, fetch, [20, 11]))
        return taken, slots_of(ranks[rank], [1, 2, 3, 4]), slots_of(ranks[rank], [5, 6, 7]), \
            ranks[rank].token_to_kv_pool_allocator.available_size()

    first, second = on_every_rank(2, move)
    assert first == second and first[0] == (3, 0) and len(first[1]) == 3 and first[2] == []


@pytest.mark.parametrize("kind", ["hybrid", "cyclic"])
def test_under_hybrid_attention_or_cyclic_placement_the_remainder_heads_rows_are_taken_over_too(kind, tmp_path,
                                                                                                monkeypatch):
    """Two TP ranks with one TP head each (0 and 1) and the remainder heads 2..4 placed by sglang-ft: a moved
    request's remainder rows go where a prefill would put them (hybrid: all on one worker, its owner-to-be; cyclic:
    in turn over both) and each worker holds exactly the store's rows of the old slots it was given; a request
    whose slot lacks the remainder heads is kept by neither rank, and its placement is undone."""
    import threading

    import torch
    from tests.unit.test_scheduler_sync import request
    from tests.thread_ranks import ThreadGroup, on_every_rank

    from sglang_ft.layers.attention.remainder_attention import RemainderKvPool
    from sglang_ft.distributed import rank_agreement
    from sglang_ft.layers.attention import remainder_placement
    from sglang_ft.layers.attention.cyclic_placement import CyclicPlacement
    from sglang_ft.layers.attention.hybrid_attention import RemainderPlacement
    from sglang_ft.managers.scheduler_components import replica_kv

    fetch, k, v = lost_replicas_store(tmp_path, {(0, G_HEADS): [11, 12, 13], (0, 2): [20]})
    group = ThreadGroup(2)
    ranks = [new_replicas_rank("unified", (r, r + 1), group.gather_for(r)) for r in range(2)]
    kind_of = CyclicPlacement if kind == "cyclic" else RemainderPlacement
    placements = [kind_of(r, 2, "load", RemainderKvPool(2, 2, k.shape[-1], 65, 65), torch.zeros((4, 32)),
                          heads=(2, G_HEADS), all_reduce=group.all_reduce_for(r)) for r in range(2)]
    of_thread: dict[int, object] = {}
    monkeypatch.setattr(remainder_placement, "active", lambda: of_thread.get(threading.get_ident()))
    monkeypatch.setattr(rank_agreement, "any_rank", lambda flag, gather: any(gather(flag)))

    def move(rank: int):
        of_thread[threading.get_ident()] = placements[rank]
        whole, torn = request("w", [1, 2], []), request("t", [5, 6], [])
        adopt(whole, [3, 4])
        adopt(torn, [7])
        taken = (replica_kv.take_over_kv(ranks[rank], whole, fetch, [11, 12, 13]),
                 replica_kv.take_over_kv(ranks[rank], torn, fetch, [20, 11]))
        return taken, placements[rank].holders.clone()

    (taken, holders), (taken_1, holders_1) = on_every_rank(2, move)
    assert taken == taken_1 == (3, 0) and torch.equal(holders, holders_1)
    new = holders.nonzero().flatten()
    assert len(new) == 3  # the torn request's slots were released
    workers = [int(b).bit_length() - 1 for b in holders[new]]
    assert len(set(workers)) == (1 if kind == "hybrid" else 2)
    for slot, old, worker in zip(new.tolist(), [11, 12, 13], workers):
        rows_k, rows_v = placements[worker].pool.rows(torch.tensor([slot]))
        assert torch.equal(rows_k[:, 0], k[:, old, 2:4]) and torch.equal(rows_v[:, 0], v[:, old, 2:4])


def test_rank0_maps_each_step_of_its_requests_to_their_slots_in_the_store(tmp_path):
    """What `KvStreamer.map_requests` tells the store after SGLang's steps: a prefill maps each request's whole row
    (its cached prefix's slots too), a decode step the one new slot of each, an idle batch nothing; the store then
    answers each request's slots, in position order."""
    import os
    import threading

    import torch
    from tests.unit.test_kv_backup import G

    from ft.kv_backup import slots_of_requests
    from ft.kv_store import serve
    from sglang_ft.mem_cache.kv_backup_stream import KvStreamer

    push, fetch = f"ipc://{tmp_path}/push", f"ipc://{tmp_path}/fetch"
    threading.Thread(target=serve, args=(push, fetch, os.getpid()), daemon=True).start()
    pool = SimpleNamespace(layer_num=G.num_layers, head_dim=G.head_dim, start_layer=0,
                           k_buffer=[torch.zeros(G.slots, G_HEADS, G.head_dim) for _ in range(G.num_layers)],
                           v_buffer=[torch.zeros(G.slots, G_HEADS, G.head_dim) for _ in range(G.num_layers)])
    streamer = KvStreamer(push, 0, 64, pool, None, G_HEADS)
    streamer.follow(pool, (0, G_HEADS), 0)
    rows = torch.zeros((4, 16), dtype=torch.int32)
    rows[0, :3], rows[1, :4] = torch.tensor([5, 6, 7]), torch.tensor([5, 6, 9, 10])  # b reuses a's first 2 slots
    reqs = [SimpleNamespace(rid="a", kv=SimpleNamespace(req_pool_idx=0)),
            SimpleNamespace(rid="b", kv=SimpleNamespace(req_pool_idx=1))]
    mode = lambda extend: SimpleNamespace(is_extend=lambda: extend, is_decode=lambda: not extend)  # noqa: E731
    prefill = SimpleNamespace(forward_mode=mode(True), reqs=reqs, seq_lens_cpu=torch.tensor([3, 4]),
                              req_to_token_pool=SimpleNamespace(req_to_token=rows))
    decode = SimpleNamespace(forward_mode=mode(False), reqs=reqs, seq_lens_cpu=torch.tensor([4, 5]),
                             out_cache_loc=torch.tensor([8, 11]))
    idle = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: False, is_decode=lambda: False),
                           reqs=[], seq_lens_cpu=torch.tensor([]))
    streamer.back_up_slots(torch.arange(5, 12))  # every head's rows, every layer, as the forwards wrote them
    assert streamer.map_requests(prefill) and streamer.map_requests(decode) and not streamer.map_requests(idle)
    wait_for_store(fetch, streamer.sender.sent)
    found = {rid: s.tolist() for rid, s in slots_of_requests(fetch, {"a": 10, "b": 10}).items()}
    assert found == {"a": [5, 6, 7, 8], "b": [5, 6, 9, 10, 11]}
    streamer.sender.close()


def wait_for_store(fetch: str, messages: int) -> None:
    """Until the store at `fetch` has taken `messages` (a sender's socket connects in the background)."""
    import time

    from ft.kv_backup import store_stats

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = store_stats(fetch) or {}
        if stats.get("writes", 0) + stats.get("request_maps", 0) + stats.get("drops", 0) >= messages:
            return
        time.sleep(0.01)
