"""The KV backup store and its wire format: rows in, rows out, and every rule about what it trusts."""

import os
import threading
import time

import numpy as np
import pytest

from ft.kv_backup import (Geometry, KvBackupSender, KvDrop, KvFetch, KvWrite, ReqSlots, SlotsOfRequests, decode,
                          encode, fetch_kv, slots_of_requests, store_stats)
from ft.kv_store import KvStore, serve
from ft.messages import decode as decode_message

G = Geometry(num_layers=2, num_kv_heads=4, head_dim=3, slots=32, itemsize=4)


def rows(n, heads, seed):
    return np.random.default_rng(seed).integers(0, 2**31, size=(n, heads, G.head_dim), dtype=np.int64).astype(
        np.uint32)


def write(store, worker, seq, layer, heads, slots, k, v, epoch=0, sender=0, moment=0):
    header = KvWrite(epoch, worker, seq, layer, heads, G, sender, moment)
    store.apply([encode(header), np.asarray(slots, dtype=np.int64).tobytes(), k.tobytes(), v.tobytes()])


def fetch(store, heads, slots, epoch=0, members=()):
    header, k, v, found = store.fetch(KvFetch(epoch, heads, members), np.asarray(slots, dtype=np.int64).tobytes())
    n, h = len(slots), heads[1] - heads[0]
    shape = (G.num_layers, n, h, G.head_dim)
    k, v = (np.frombuffer(bytes(rows_), dtype=np.uint32).reshape(shape) for rows_ in (k, v))
    return k, v, np.frombuffer(found, dtype=bool)


def fill(store, worker, heads, slots, seed, seq0=0, epoch=0, sender=0, moment=0, layers=range(G.num_layers)):
    data = []
    for layer in layers:
        width = heads[1] - heads[0]
        k, v = rows(len(slots), width, seed + layer), rows(len(slots), width, seed + 100 + layer)
        write(store, worker, seq0 + layer, layer, heads, slots, k, v, epoch, sender, moment)
        data.append((k, v))
    return data


def test_rows_round_trip_per_head_group_and_slot():
    store = KvStore()
    a = fill(store, worker=0, heads=(0, 2), slots=[3, 5, 7], seed=1)
    b = fill(store, worker=1, heads=(2, 4), slots=[5, 9], seed=2)
    k, v, found = fetch(store, (0, 2), [7, 3])
    assert found.all()
    assert np.array_equal(k[1, 0], a[1][0][2]) and np.array_equal(v[0, 1], a[0][1][0])
    k, v, found = fetch(store, (2, 4), [9])
    assert found.all() and np.array_equal(k[0, 0], b[0][0][1])
    _, _, found = fetch(store, (1, 3), [5, 9])  # head 1 never had slot 9
    assert found.tolist() == [True, False]


def test_a_row_needs_every_layer():
    store = KvStore()
    write(store, 0, 0, 0, (0, 1), [4], rows(1, 1, 0), rows(1, 1, 1))
    assert fetch(store, (0, 1), [4])[2].tolist() == [False]


def test_freed_slots_are_dropped():
    store = KvStore()
    fill(store, 0, (0, 2), [3, 4], seed=1)
    store.apply([encode(KvDrop(0, 0, 2, (0, 2))), np.array([4], dtype=np.int64).tobytes()])
    assert fetch(store, (0, 2), [3, 4])[2].tolist() == [True, False]


def drop(store, worker, seq, heads, slots, epoch=0, moment=0, sender=0):
    store.apply([encode(KvDrop(epoch, worker, seq, heads, sender, moment)), np.asarray(slots, dtype=np.int64).tobytes()])


# Hybrid attention: remainder head 3's rows of a slot are written by each request's owner and dropped by the slot's
# holders when SGLang frees it, over separate sockets that the store reads in no set order. Moments as the workers
# stamp them: step j's rows at 2j, slots freed after step j at 2j + 1.

def test_a_holders_drop_overtaken_by_the_next_owners_write_keeps_that_write():
    store = KvStore()
    fill(store, worker=0, heads=(3, 4), slots=[5], seed=1, moment=4)  # request A on worker 0, step 2
    newer = fill(store, worker=1, heads=(3, 4), slots=[5], seed=2, moment=8)  # slot 5 reused: B on worker 1, step 4
    drop(store, 0, 2, (3, 4), [5], moment=5)  # worker 0 freed it after step 2; its socket was behind
    k, v, found = fetch(store, (3, 4), [5])
    assert found.tolist() == [True] and np.array_equal(k[1, 0], newer[1][0][0]) and np.array_equal(v[0, 0],
                                                                                                  newer[0][1][0])


def test_a_late_write_of_a_freed_slot_does_not_bring_it_back():
    """Worker 2 held head 3 in epoch 0 and stays in the group; its last step's rows were still in its socket when
    the slot, freed in epoch 1 by the holder then, reached the store."""
    store = KvStore()
    fill(store, worker=2, heads=(3, 4), slots=[5], seed=1, epoch=0, moment=38, sender=7)  # epoch 0, step 19
    drop(store, 1, 0, (3, 4), [5], epoch=1, moment=3)
    fill(store, worker=2, heads=(3, 4), slots=[5], seed=3, epoch=0, moment=40, sender=7, seq0=2)  # step 20, late
    assert fetch(store, (3, 4), [5], epoch=1, members=((2, 7),))[2].tolist() == [False]
    assert store.counters["late_rows_refused"] == G.num_layers


def test_an_older_write_arriving_after_a_newer_one_does_not_replace_it():
    store = KvStore()
    newer = fill(store, worker=1, heads=(3, 4), slots=[5, 6], seed=2, moment=8)
    old = fill(store, worker=0, heads=(3, 4), slots=[6, 7], seed=1, moment=4)  # slot 7 is only in the old write
    k, _, found = fetch(store, (3, 4), [5, 6, 7])
    assert found.tolist() == [True, True, True]
    assert np.array_equal(k[0, 1], newer[0][0][1]) and np.array_equal(k[0, 2], old[0][0][1])


def test_a_drop_invalidates_the_layers_written_before_it_only():
    """The next owner's write had reached layer 0 when the drop came: the slot is whole again only once every
    layer of the new rows arrived."""
    store = KvStore()
    fill(store, worker=0, heads=(3, 4), slots=[5], seed=1, moment=4)
    fill(store, worker=1, heads=(3, 4), slots=[5], seed=2, moment=8, layers=[0])
    drop(store, 0, 2, (3, 4), [5], moment=5)
    assert fetch(store, (3, 4), [5])[2].tolist() == [False]  # layer 1 still held A's row: dropped
    newer = fill(store, worker=1, heads=(3, 4), slots=[5], seed=2, moment=8, layers=[1], seq0=0)
    k, _, found = fetch(store, (3, 4), [5])
    assert found.tolist() == [True] and np.array_equal(k[1, 0], newer[0][0][0])


def test_a_sequence_gap_invalidates_that_workers_heads():
    store = KvStore()
    fill(store, 0, (0, 2), [3], seed=1)
    fill(store, 1, (2, 4), [3], seed=2)
    write(store, 0, 5, 0, (0, 2), [8], rows(1, 2, 3), rows(1, 2, 4))  # messages 2..4 were dropped
    assert store.counters["sequence_gaps"] == 1
    assert fetch(store, (0, 2), [3])[2].tolist() == [False]
    assert fetch(store, (2, 4), [3])[2].tolist() == [True]


def test_a_sequence_gap_invalidates_every_span_that_process_wrote():
    """Hybrid attention: a worker streams its TP heads and the remainder heads it owns in separate messages, so the
    message lost may have been for either span, whichever message reveals the gap."""
    store = KvStore()
    fill(store, 0, (0, 1), [3], seed=1)  # TP head, messages 0 and 1
    fill(store, 0, (3, 4), [5], seed=2, seq0=2)  # remainder head, messages 2 and 3
    fill(store, 1, (1, 2), [3], seed=3)
    write(store, 0, 6, 0, (0, 1), [8], rows(1, 1, 3), rows(1, 1, 4))  # messages 4 and 5 were dropped
    assert store.counters["sequence_gaps"] == 1
    assert fetch(store, (3, 4), [5])[2].tolist() == [False]  # not only the TP head of the revealing message
    assert fetch(store, (0, 1), [3])[2].tolist() == [False]
    assert fetch(store, (1, 2), [3])[2].tolist() == [True]  # another worker's heads stay


def test_a_restarted_worker_numbering_from_zero_again_is_no_gap():
    store = KvStore()
    fill(store, 1, (2, 4), [3], seed=2)  # the worker's first process, messages 0 and 1
    write(store, 1, 0, 0, (2, 3), [6], rows(1, 1, 3), rows(1, 1, 4), sender=4242)  # its restarted process
    write(store, 1, 1, 1, (2, 3), [6], rows(1, 1, 5), rows(1, 1, 6), sender=4242)
    assert store.counters["sequence_gaps"] == 0
    assert fetch(store, (2, 4), [3])[2].tolist() == [True] and fetch(store, (2, 3), [6])[2].tolist() == [True]
    write(store, 1, 5, 0, (2, 3), [7], rows(1, 1, 7), rows(1, 1, 8), sender=4242)  # now it skips messages
    assert store.counters["sequence_gaps"] == 1 and fetch(store, (2, 3), [6])[2].tolist() == [False]


def test_writes_older_than_the_newest_fetch_are_refused():
    store = KvStore()
    old = fill(store, 0, (0, 1), [3], seed=1)
    fetch(store, (0, 1), [3], epoch=2)
    fill(store, 0, (0, 1), [3], seed=9, seq0=2, epoch=1)  # a fenced worker's late writes
    k, _, found = fetch(store, (0, 1), [3], epoch=2)
    assert store.counters["stale_refused"] == 2 and found.all() and np.array_equal(k[0, 0], old[0][0][0])


def test_a_staying_members_writes_sent_before_the_regroup_still_count_after_its_fetch():
    """The regroup's fetch (epoch 1, members 0 and 2) can overtake what survivor 0 sent just before it. Those late
    writes are accepted, so 0's next message is no gap and its heads stay backed up; the same worker id from
    another process (a fenced one, later re-admitted as a new process) and a worker that left are refused."""
    store = KvStore()
    fill(store, 0, (0, 1), [3], seed=1, sender=100)
    kept = fill(store, 1, (1, 2), [3], seed=2, sender=101)
    fetch(store, (1, 2), [3], epoch=1, members=((0, 100), (2, 300)))
    late = fill(store, 0, (0, 1), [4], seed=3, seq0=2, epoch=0, sender=100)  # sent before the regroup
    fill(store, 0, (0, 2), [5], seed=4, seq0=4, epoch=1, sender=100)
    assert store.counters["stale_refused"] == 0 and store.counters["sequence_gaps"] == 0
    k, _, found = fetch(store, (0, 1), [3, 4], epoch=1)
    assert found.all() and np.array_equal(k[0, 1], late[0][0][0])
    fill(store, 1, (1, 2), [3], seed=5, seq0=2, epoch=0, sender=101)  # worker 1 left the group
    fetch(store, (0, 1), [3], epoch=2, members=((0, 100), (1, 102)))  # 1 re-admitted as process 102
    fill(store, 1, (1, 2), [3], seed=6, seq0=4, epoch=1, sender=101)  # the old process 101, late again
    assert store.counters["stale_refused"] == 4
    k, _, found = fetch(store, (1, 2), [3], epoch=2)
    assert found.all() and np.array_equal(k[0, 0], kept[0][0][0])  # what 1 wrote before it left


@pytest.mark.parametrize("frames", [
    [b"junk"],
    [encode(KvDrop(0, 0, 0, (0, 1)))],  # missing the slots frame
    [encode(KvWrite(0, 0, 0, 0, (0, 9), G)), b"", b"", b""],  # heads out of range
    [encode(KvWrite(0, 0, 0, 0, (0, 1), G)), np.array([99], dtype=np.int64).tobytes(), b"x" * 12, b"x" * 12],
    [encode(KvWrite(0, 0, 0, 0, (0, 1), G)), np.array([1], dtype=np.int64).tobytes(), b"x" * 5, b"x" * 5],
])
def test_malformed_messages_are_counted_not_applied(frames):
    store = KvStore()
    store.apply(frames)
    assert store.counters["malformed"] == 1 and store.counters["writes"] == 0


def test_decoders_reject_foreign_frames():
    assert decode(b"\x00\x01") is None and decode(encode(KvFetch(1, (0, 1)))) == KvFetch(1, (0, 1))


def test_sender_never_blocks_and_counts_what_a_full_queue_drops(tmp_path):
    sender = KvBackupSender(f"ipc://{tmp_path}/nobody", worker=0, queue_messages=4)
    sender.geometry, sender.heads = G, (0, 1)
    started = time.monotonic()
    for seq in range(50):
        sender.write(0, np.array([1]), rows(1, 1, seq), rows(1, 1, seq))
    assert time.monotonic() - started < 2.0
    assert sender.dropped >= 40 and sender.sent + sender.dropped == 50 and sender.seq == 50
    sender.close()


def test_sender_reports_what_zmq_still_queues_until_the_store_takes_it(tmp_path):
    import zmq

    endpoint = f"ipc://{tmp_path}/late"
    sender = KvBackupSender(endpoint, worker=0, queue_messages=64)
    sender.geometry, sender.heads = G, (0, 1)
    for seq in range(10):
        assert sender.write(0, np.array([1]), rows(1, 1, seq), rows(1, 1, seq))
    assert sender.counters() == (10, 0, sender.bytes_sent, 10)  # no store yet: all ten wait in ZMQ's queue
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(endpoint)
    assert [len(pull.recv_multipart()) for _ in range(10)] == [4] * 10
    deadline = time.monotonic() + 10
    while sender.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.queued() == 0
    sender.close()
    pull.close()


def test_heartbeats_carry_the_backup_counters_and_an_older_beat_still_decodes(tmp_path):
    import msgspec

    from ft.heartbeat import HeartbeatSender, MessageReceiver
    from ft.messages import Heartbeat

    receiver = MessageReceiver(f"ipc://{tmp_path}/hb")
    beats = HeartbeatSender(f"ipc://{tmp_path}/hb", worker=1, interval_s=0.02)
    beats.kv_backup_counters = lambda: (7, 1, 4096, 3)
    beats.start()
    try:
        deadline = time.monotonic() + 10
        received = []
        while not received and time.monotonic() < deadline:
            received = receiver.poll(0.1)
    finally:
        beats.stop()
        receiver.close()
    assert (received[0].kv_backup, received[0].kv_backup_queued) == ((7, 1, 4096), 3)
    older = msgspec.msgpack.encode({"type": "Heartbeat", "worker": 1, "pid": 2, "epoch": 0, "seq": 5,
                                    "kv_backup": [7, 1, 4096]})  # from a worker without the queued count
    assert decode_message(older) == Heartbeat(1, 2, 0, 5, (7, 1, 4096), kv_backup_queued=0)


def map_requests(store, seq, rows_by_rid: dict, starts: dict | None = None, worker=0):
    starts = starts or {}
    header = ReqSlots(0, worker, seq, (0, 2), tuple(rows_by_rid), tuple(starts.get(r, 0) for r in rows_by_rid),
                      tuple(len(s) for s in rows_by_rid.values()))
    store.apply([encode(header), np.concatenate([np.asarray(s, dtype=np.int64) for s in rows_by_rid.values()])
                 .tobytes()])


def slots_of(store, limits: dict) -> dict:
    header, slots = store.request_slots(SlotsOfRequests(tuple(limits), tuple(limits.values())))
    counts, slots = decode(header).counts, np.frombuffer(slots, dtype=np.int64)
    bounds = np.cumsum((0, *counts))
    return {rid: slots[bounds[i]:bounds[i + 1]].tolist() for i, rid in enumerate(limits)}


def test_the_store_knows_each_requests_slots_while_their_rows_are_whole():
    """Rank 0 maps each request's positions to slots (a prefill's whole row, then one slot per decode); the store
    answers with the slots of the first positions whose rows it holds for every head, up to a limit."""
    store = KvStore()
    fill(store, 0, (0, 2), [3, 4, 5, 6, 9], seed=1)
    fill(store, 1, (2, 4), [3, 4, 5, 6], seed=2)  # slot 9 only half written: a step torn by the failure
    map_requests(store, 2, {"a": [3, 4, 5], "b": [3, 4]})  # b shares a's first two slots (a cached prefix)
    map_requests(store, 3, {"a": [6], "b": [9]}, starts={"a": 3, "b": 2})  # a decode step
    assert slots_of(store, {"a": 10, "b": 10, "c": 10}) == {"a": [3, 4, 5, 6], "b": [3, 4], "c": []}
    assert slots_of(store, {"a": 2}) == {"a": [3, 4]}
    assert store.stats()["requests_mapped"] == 2 and store.counters["sequence_gaps"] == 0


def test_a_slot_dropped_since_it_was_mapped_is_not_trusted_even_once_rewritten():
    """A request retracted and its slot handed to another request: the old map must not name the new KV."""
    store = KvStore()
    fill(store, 0, (0, 4), [3, 4, 5], seed=1)
    map_requests(store, 2, {"a": [3, 4, 5]})
    store.apply([encode(KvDrop(0, 0, 3, (0, 4))), np.array([4], dtype=np.int64).tobytes()])
    fill(store, 0, (0, 4), [4], seed=5, seq0=4)  # slot 4 reused and written again
    assert slots_of(store, {"a": 3}) == {"a": [3]}
    map_requests(store, 6, {"a": [3, 4, 5]})  # the request prefilled again: its new row is mapped afresh
    assert slots_of(store, {"a": 3}) == {"a": [3, 4, 5]}


def test_a_request_map_that_does_not_match_its_slots_is_refused():
    store = KvStore()
    fill(store, 0, (0, 4), [3], seed=1)
    header = ReqSlots(0, 0, 2, (0, 4), ("a",), (0,), (2,))
    store.apply([encode(header), np.array([3], dtype=np.int64).tobytes()])
    assert store.counters["malformed"] == 1 and slots_of(store, {"a": 5}) == {"a": []}


def test_store_process_loop_applies_streamed_writes_before_answering_a_fetch(tmp_path):
    push, rep = f"ipc://{tmp_path}/push", f"ipc://{tmp_path}/fetch"
    threading.Thread(target=serve, args=(push, rep, os.getpid()), daemon=True).start()
    # The store is listening before the sender connects, as in a server (the controller starts it when it
    # starts): a PUSH socket that connects before the bind retries only after ZMQ's reconnect interval, so its
    # writes could still be on their way when the fetch arrives (a unit run failed so).
    assert store_stats(rep, timeout_s=10.0) is not None
    sender = KvBackupSender(push, worker=3)
    sender.geometry, sender.heads = G, (1, 3)
    written = [(rows(2, 2, layer), rows(2, 2, layer + 7)) for layer in range(G.num_layers)]
    for layer, (k, v) in enumerate(written):
        assert sender.write(layer, np.array([6, 2]), k, v)
    k, v, found = fetch_kv(rep, 1, (1, 3), np.array([2, 6, 11]))
    assert found.tolist() == [True, True, False]
    assert np.array_equal(k[1, 1], written[1][0][0]) and np.array_equal(v[0, 0], written[0][1][1])
    stats = store_stats(rep)
    assert stats["writes"] == 2 and stats["epoch"] == 1 and stats["blocks_held"] == 1
    whole = KvBackupSender(push, worker=4)  # every head of slot 6, none of slot 2's heads 0 and 3
    whole.geometry, whole.heads = G, (0, 4)
    whole.epoch = sender.epoch = 1  # the fetch above moved the store to epoch 1
    for layer in range(G.num_layers):
        assert whole.write(layer, np.array([6]), rows(1, 4, layer), rows(1, 4, layer + 1))
    assert sender.request_slots(["r"], [0], [2], np.array([6, 2]))
    assert {rid: s.tolist() for rid, s in slots_of_requests(rep, {"r": 5, "x": 5}).items()} == {"r": [6], "x": []}
    sender.close()
    whole.close()


def test_keeper_reports_a_dead_store_as_degraded_and_respawns_it_when_asked(tmp_path):
    from ft.kv_store_keeper import KvStoreKeeper

    for respawn in (False, True):
        keeper = KvStoreKeeper(f"ipc://{tmp_path}/p{respawn}", f"ipc://{tmp_path}/f{respawn}", respawn)
        try:
            deadline = time.monotonic() + 30
            while keeper.status()["store"] is None and time.monotonic() < deadline:
                time.sleep(0.1)  # the store answers once it has imported and bound its sockets
            first = keeper.status()
            assert first["state"] == "healthy" and first["store"]["writes"] == 0
            keeper.process.kill()
            keeper.process.wait(timeout=10)
            keeper.check()
            st = keeper.status()
            assert [e["event"] for e in st["events"]][:2] == ["started", "died (exit -9)"]
            if respawn:
                assert st["state"] == "healthy" and st["restarts"] == 1 and st["pid"] != first["pid"]
            else:
                assert st["state"] == "degraded" and st["pid"] is None and st["store"] is None
        finally:
            keeper.stop()
