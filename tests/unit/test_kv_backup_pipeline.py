"""The KV backup between steps (mem_cache/kv_backup_pipeline.py, kv_copy_engine.py, kv_backup_stream.after_step):
the CUDA engine driven by a fake stream and events, the messages applied to a real store."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ft.kv_backup import Geometry, KvBackupSender
from ft.kv_store import KvStore
from sglang_ft.mem_cache.kv_backup_pipeline import BackupPipeline
from sglang_ft.mem_cache.kv_backup_stream import KvStreamer
from sglang_ft.mem_cache.kv_copy_engine import StreamCopyEngine, SyncCopyEngine

LAYERS, HEADS, DIM, SLOTS = 2, 2, 4, 32
G = Geometry(num_layers=LAYERS, num_kv_heads=4, head_dim=DIM, slots=SLOTS, itemsize=4)


class FakeEvent:
    def __init__(self, log):
        self.done, self.log = False, log

    def record(self, stream):
        self.log.append(("record", stream))

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


class FakeStream:
    """Records what the engine asks of a CUDA stream; `events` lets the test complete copies one by one."""

    def __init__(self):
        self.log, self.events = [], []

    def wait_stream(self, other):
        self.log.append(("wait", other))

    def event(self):
        event = FakeEvent(self.log)
        self.events.append(event)
        return event


def fake_engine():
    stream = FakeStream()
    engine = StreamCopyEngine(stream, lambda: "compute", stream.event, lambda s: contextlib.nullcontext(),
                              pin_memory=False)
    return engine, stream


class StoreSender(KvBackupSender):
    """The real sender's messages, applied to a real store instead of going through ZMQ."""

    def __init__(self, store: KvStore, worker: int = 0, heads=(0, HEADS)):
        super().__init__("inproc://kv-pipeline-test", worker, 16)
        self.store, self.frames = store, []
        self.heads, self.geometry = heads, G

    def _send(self, frames) -> bool:
        self.seq += 1
        frames = [bytes(memoryview(np.ascontiguousarray(f)).cast("B")) if not isinstance(f, bytes) else f
                  for f in frames]
        self.frames.append(frames)
        self.store.apply(frames)
        self.sent += 1
        return True


def pool_of(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=generator) for _ in range(LAYERS)]
    return k, [-t for t in k]


def stage(pipeline, k, v, slots, heads=(0, HEADS)) -> bool:
    slots = torch.tensor(slots, dtype=torch.int64)
    return pipeline.stage(range(LAYERS), heads, slots, slots, k, v)


def held(store: KvStore, slots, heads=(0, HEADS)) -> np.ndarray:
    if store.valid is None:  # nothing written yet
        return np.zeros(len(slots), dtype=bool)
    return store.valid[:, heads[0]:heads[1], slots].all(axis=(0, 1))


def as_float(store_rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(store_rows)).view(torch.float32)


def test_rows_reach_the_store_only_once_their_copy_completed():
    store, (k, v) = KvStore(), pool_of(1)
    engine, stream = fake_engine()
    pipeline = BackupPipeline(StoreSender(store), engine)
    assert stage(pipeline, k, v, [3, 4, 5])
    assert ("wait", "compute") in stream.log  # the copy stream waits for the forward that wrote the rows
    assert pipeline.pump() == 0 and pipeline.sender.sent == 0 and pipeline.queued() == LAYERS
    stream.events[0].done = True
    assert pipeline.pump() == 1 and pipeline.sender.sent == LAYERS and pipeline.queued() == 0
    assert held(store, [3, 4, 5]).all() and not held(store, [6]).any()
    for layer in range(LAYERS):  # bit for bit what the pool held, [heads, slots, dim] in the store
        assert torch.equal(as_float(store.k[layer][:HEADS, [3, 4, 5]]), k[layer][[3, 4, 5]].transpose(0, 1))
        assert torch.equal(as_float(store.v[layer][:HEADS, [3, 4, 5]]), v[layer][[3, 4, 5]].transpose(0, 1))


def test_entries_go_in_order_even_when_a_later_copy_completes_first():
    store, (k, v) = KvStore(), pool_of(2)
    engine, stream = fake_engine()
    pipeline = BackupPipeline(StoreSender(store), engine)
    stage(pipeline, k, v, [1])
    stage(pipeline, k, v, [2])
    stream.events[1].done = True
    assert pipeline.pump() == 0  # the second waits for the first
    stream.events[0].done = True
    assert pipeline.pump() == 2
    from ft.kv_backup import decode

    headers = [decode(f[0]) for f in pipeline.sender.frames]
    assert [h.seq for h in headers] == list(range(2 * LAYERS))  # nothing twice, nothing out of order
    assert [np.frombuffer(f[1], dtype=np.int64).tolist() for f in pipeline.sender.frames] == \
        [[1]] * LAYERS + [[2]] * LAYERS
    assert store.counters["sequence_gaps"] == 0


def test_a_full_ring_drops_and_counts_never_blocks_and_the_store_distrusts_exactly_those_slots():
    store, (k, v) = KvStore(), pool_of(3)
    engine, stream = fake_engine()
    pipeline = BackupPipeline(StoreSender(store), engine, entries=2)
    stage(pipeline, k, v, [9])  # an older write of slot 20, already in the store
    stream.events[0].done = True
    pipeline.pump()
    assert stage(pipeline, k, v, [20]) and stage(pipeline, k, v, [1, 2])
    assert not stage(pipeline, k, v, [3, 4])  # every buffer in flight: dropped at once, no wait on a copy
    assert pipeline.staging_dropped == 1 and pipeline.messages_dropped == LAYERS
    assert not stage(pipeline, k, v, [9])  # a rewrite of slot 9 lost: its older rows must not be trusted
    stream.events[1].done = stream.events[2].done = True
    assert pipeline.pump() == 4
    assert held(store, [20, 1, 2]).all() and not held(store, [3, 4, 9]).any()
    assert store.counters["sequence_gaps"] == 0  # marked exactly, not the whole worker distrusted
    assert stage(pipeline, k, v, [5])  # buffers came back to the ring
    stream.events[3].done = True
    pipeline.pump()
    assert held(store, [5]).all()


def test_a_drop_never_overtakes_an_earlier_write_of_its_slot_nor_a_later_write_the_drop():
    store, (k, v) = KvStore(), pool_of(4)
    engine, stream = fake_engine()
    sender = StoreSender(store)
    pipeline = BackupPipeline(sender, engine)
    stage(pipeline, k, v, [7, 8])  # step 1 writes slots 7 and 8 (copy in flight)
    pipeline.send_in_turn(lambda s: s.drop(np.array([7], dtype=np.int64)))  # the request ends: 7 freed
    assert sender.sent == 0  # the drop waits behind the write it follows
    k2, v2 = pool_of(5)
    stage(pipeline, k2, v2, [7])  # step 2: slot 7 reused by another request
    stream.events[0].done = True
    assert pipeline.pump() == 2 and not held(store, [7]).any() and held(store, [8]).all()
    stream.events[1].done = True
    pipeline.pump()
    assert held(store, [7]).all()  # the reused slot's new rows, after its drop
    assert torch.equal(as_float(store.k[1][:HEADS, 7]), k2[1][7])


def test_the_wrong_order_would_have_been_seen():
    """Control for the test above: the same messages, a drop sent at once (the old code's order), leave slot 7
    trusted with the freed request's rows."""
    store, (k, v) = KvStore(), pool_of(4)
    engine, stream = fake_engine()
    sender = StoreSender(store)
    pipeline = BackupPipeline(sender, engine)
    stage(pipeline, k, v, [7, 8])
    sender.drop(np.array([7], dtype=np.int64))  # overtakes the write
    stream.events[0].done = True
    pipeline.pump()
    assert held(store, [7]).all()


def test_flush_waits_for_the_copies_and_hands_everything_over():
    store, (k, v) = KvStore(), pool_of(6)
    engine, _ = fake_engine()
    pipeline = BackupPipeline(StoreSender(store), engine)
    stage(pipeline, k, v, [1, 2])
    pipeline.flush()
    assert pipeline.queued() == 0 and held(store, [1, 2]).all()


def fake_pool(seed: int):
    k, v = pool_of(seed)
    return SimpleNamespace(k_buffer=k, v_buffer=v, start_layer=0, layer_num=LAYERS, head_dim=DIM)


def mode(extend: bool):
    return SimpleNamespace(is_extend=lambda: extend, is_decode=lambda: not extend)


def streamer_with(store: KvStore, engine, pool) -> KvStreamer:
    streamer = KvStreamer("inproc://kv-streamer-test", 0, 16, pool, None, 4, engine=engine)
    streamer.sender = streamer.pipeline.sender = StoreSender(store)
    streamer.follow(pool, (0, HEADS), 0)
    return streamer


def test_after_a_step_the_cpu_backs_up_the_steps_slots_for_every_layer_at_once():
    store, pool = KvStore(), fake_pool(7)
    streamer = streamer_with(store, SyncCopyEngine(), pool)
    streamer.after_step(SimpleNamespace(forward_mode=mode(True), out_cache_loc=torch.tensor([4, 5, 6])))
    assert held(store, [4, 5, 6]).all() and streamer.counters()[0] == LAYERS and streamer.counters()[3] == 0
    assert torch.equal(as_float(store.k[0][:HEADS, 6]), pool.k_buffer[0][6])
    streamer.after_step(SimpleNamespace(forward_mode=mode(False), out_cache_loc=torch.tensor([9])))
    assert held(store, [9]).all()


def test_after_a_step_on_cuda_the_rows_go_at_the_next_step_and_the_step_never_waits():
    store, pool = KvStore(), fake_pool(8)
    engine, stream = fake_engine()
    streamer = streamer_with(store, engine, pool)
    streamer.after_step(SimpleNamespace(forward_mode=mode(False), out_cache_loc=torch.tensor([4])))
    assert not held(store, [4]).any() and streamer.counters()[3] == LAYERS  # queued, not lost
    streamer.on_slots_freed(object(), torch.tensor([4]))  # not this streamer's allocator: ignored
    stream.events[0].done = True
    streamer.after_step(SimpleNamespace(forward_mode=mode(False), out_cache_loc=torch.tensor([5])))
    assert held(store, [4]).all() and not held(store, [5]).any()


def test_the_remainder_rows_a_rank_wrote_are_staged_after_the_step_with_their_heads():
    from sglang_ft.layers.attention.remainder_attention import RemainderKvPool

    store, pool = KvStore(), fake_pool(9)
    streamer = streamer_with(store, SyncCopyEngine(), pool)
    remainder = RemainderKvPool(LAYERS, 1, DIM, SLOTS, capacity=8)
    rows = torch.arange(LAYERS * 2 * DIM, dtype=torch.float32).reshape(LAYERS, 2, 1, DIM)
    remainder.put_rows(torch.tensor([11, 12]), rows, -rows)
    placement = SimpleNamespace(pool=remainder, heads=(3, 4), written=torch.tensor([11, 12]))
    placement.take_written = lambda: placement.__dict__.pop("written", None)
    streamer.after_step(SimpleNamespace(forward_mode=mode(True), out_cache_loc=torch.tensor([11, 12])), placement)
    assert held(store, [11, 12], heads=(3, 4)).all() and held(store, [11, 12]).all()
    assert torch.equal(as_float(store.k[1][3, [11, 12]]), rows[1, :, 0])
    assert torch.equal(as_float(store.v[0][3, [11, 12]]), -rows[0, :, 0])


@pytest.mark.parametrize("extend", [True, False])
def test_an_empty_or_idle_step_stages_nothing(extend):
    store, pool = KvStore(), fake_pool(10)
    streamer = streamer_with(store, SyncCopyEngine(), pool)
    streamer.after_step(SimpleNamespace(forward_mode=mode(extend), out_cache_loc=torch.empty(0, dtype=torch.int64)))
    idle = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: False)
    streamer.after_step(SimpleNamespace(forward_mode=idle, out_cache_loc=torch.tensor([1])))
    assert streamer.counters()[0] == 0


class DelayedSender(StoreSender):
    """A worker whose socket is behind: its messages reach the store only when `deliver()` is called."""

    def _send(self, frames) -> bool:
        self.seq += 1
        self.frames.append([bytes(memoryview(np.ascontiguousarray(f)).cast("B")) if not isinstance(f, bytes) else f
                            for f in frames])
        self.sent += 1
        return True

    def deliver(self) -> None:
        for frames in self.frames:
            self.store.apply(frames)
        self.frames = []


def remainder_writer(rows: torch.Tensor, slots: list[int]):
    """A rank's hybrid-attention placement that wrote remainder head 3's `rows` at `slots` in the latest step."""
    from sglang_ft.layers.attention.remainder_attention import RemainderKvPool

    remainder = RemainderKvPool(LAYERS, 1, DIM, SLOTS, capacity=8)
    written = torch.tensor(slots, dtype=torch.int64)
    if slots:
        remainder.put_rows(written, rows, -rows)
    placement = SimpleNamespace(pool=remainder, heads=(3, 4), written=written)
    placement.take_written = lambda: placement.__dict__.pop("written", None)
    return placement


def test_a_freed_remainder_row_and_its_next_owners_write_reach_the_store_in_any_order():
    """Worker 0 owns request A, whose remainder row lands in slot 11 at step 1; SGLang frees the slot after step 1
    (worker 0, its holder, drops it); at step 2 request B, owned by worker 1, writes slot 11. Worker 0's socket is
    behind, so its drop reaches the store after worker 1's write: B's row must stay (it was lost, to be computed
    again at the next regroup, when the store went by arrival)."""
    store = KvStore()
    streamers = [streamer_with(store, SyncCopyEngine(), fake_pool(20 + w)) for w in (0, 1)]
    streamers[0].sender = streamers[0].pipeline.sender = DelayedSender(store, worker=0)
    streamers[0].follow(streamers[0].pool, (0, HEADS), 0)
    streamers[1].sender = streamers[1].pipeline.sender = StoreSender(store, worker=1, heads=(HEADS, 3))
    streamers[1].follow(streamers[1].pool, (HEADS, 3), 0)
    a_rows = torch.full((LAYERS, 1, 1, DIM), 1.0)
    b_rows = torch.full((LAYERS, 1, 1, DIM), 2.0)
    step = SimpleNamespace(forward_mode=mode(False), out_cache_loc=torch.tensor([11]))
    streamers[0].after_step(step, remainder_writer(a_rows, [11]))  # step 1
    streamers[1].after_step(step, remainder_writer(a_rows, []))
    streamers[0].drop_rows((3, 4), torch.tensor([11]))  # freed after step 1
    streamers[0].on_slots_freed(streamers[0].allocator, torch.tensor([11]))
    streamers[1].on_slots_freed(streamers[1].allocator, torch.tensor([11]))
    streamers[0].after_step(step, remainder_writer(a_rows, []))  # step 2: B, owned by worker 1, writes slot 11
    streamers[1].after_step(step, remainder_writer(b_rows, [11]))
    streamers[0].sender.deliver()
    assert held(store, [11], heads=(3, 4)).all()
    assert torch.equal(as_float(store.k[1][3, [11]]), b_rows[1, :, 0])
