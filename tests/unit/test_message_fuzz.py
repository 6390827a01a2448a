"""The backup store's two sockets fed every malformed kind of tests/hostile_messages.py, garbage and forged streams
(hypothesis): each message is applied, or counted as malformed and dropped by a check (never by the last-resort
catch: `failed` stays 0), and what the store holds never outgrows its geometry. The controller's and the orders'
channels: test_message_fuzz_reports.py; a live store process: test_hostile_peers.py."""

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile_messages as hostile
from ft.kv_backup import Geometry, KvFetched, KvWrite, RequestSlotsFound, decode, encode
from ft.kv_store import KvStore
from ft.request_slots import MAX_REQUESTS, POSITIONS_PER_SLOT

G = hostile.G
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI machines are busy


def holding_g() -> KvStore:
    """A store that holds every slot of G whole (every layer and head written)."""
    store = KvStore()
    every = range(G.slots)
    for layer in range(G.num_layers):
        store.apply(hostile.write(slots=every, layer=layer, seq=layer, seed=layer))
    assert store.counters["writes"] == G.num_layers and store.counters["malformed"] == 0
    return store


def applied(store: KvStore) -> dict:
    return {k: store.counters[k] for k in ("writes", "drops", "request_maps", "fetches")}


@pytest.mark.parametrize("name", hostile.STREAM)
def test_every_malformed_kind_on_the_write_stream_is_refused_by_a_check(name):
    store = holding_g()
    before, k = applied(store), store.k.copy()
    store.apply(hostile.STREAM[name])
    assert store.counters["malformed"] == 1 and store.counters["failed"] == 0
    assert applied(store) == before and len(store.requests) == 0 and np.array_equal(store.k, k)
    assert store.geometry == G and store.valid.all()


@pytest.mark.parametrize("name", hostile.REQUESTS)
def test_every_malformed_request_gets_the_empty_reply_and_is_counted(name):
    store = holding_g()
    reply = store.answer(hostile.REQUESTS[name])
    assert decode(reply[0]) == KvFetched(0, None) and len(reply) == 4  # the REP socket is free for the next one
    assert store.counters["malformed"] == 1 and store.counters["failed"] == 0 and store.epoch == 0
    assert msgspec.json.decode(store.answer(hostile.pack({"type": "StoreStats"}))[0])["malformed"] == 1


def test_a_geometry_inside_the_wire_bounds_but_larger_than_the_host_is_refused_not_allocated():
    huge = dict(hostile.GEOMETRY, num_layers=1 << 10, num_kv_heads=1 << 12, head_dim=1 << 12, slots=1 << 20)
    header = hostile.pack(dict(type="KvWrite", epoch=0, worker=0, seq=0, layer=0, heads=[0, 1], geometry=huge))
    store = KvStore()
    store.apply(header + [hostile.int64([0]), b"\0" * 2 * 4096, b"\0" * 2 * 4096])
    assert store.geometry is None and store.counters["malformed"] == 1 and store.counters["failed"] == 0


def test_request_maps_stay_within_their_budget_whatever_rank_0_sends():
    """Maps of ever new requests, each row the whole pool: the least recently updated rows go, the newest stay."""
    store, whole_pool = holding_g(), tuple(range(G.slots))
    for i in range(500):
        store.apply(hostile.req_slots(rids=(f"r{i}",), starts=(0,), counts=(G.slots,), slots=whole_pool,
                                      seq=G.num_layers + i))
    assert store.counters["request_maps"] == 500 and store.counters["malformed"] == 0
    assert store.requests.positions <= POSITIONS_PER_SLOT * G.slots and len(store.requests) <= MAX_REQUESTS
    header, found = store.answer(hostile.slots_query(rids=("r499", "r0"), limits=(G.slots, G.slots)))
    assert decode(header) == RequestSlotsFound((G.slots, 0)) and np.frombuffer(found, np.int64).tolist() == [
        *whole_pool]


# ---- valid request maps, against a model of the rules written here (positions -> slot, per request) ----

RIDS = ("a", "b", "c", "d")  # few: the maps stay inside the budget, so the model needs no eviction


@st.composite
def request_map(draw):
    rids = draw(st.lists(st.sampled_from(RIDS), max_size=3, unique=True))
    starts, counts, slots = [], [], []
    for _ in rids:
        start = draw(st.integers(0, G.slots - 1))
        count = draw(st.integers(0, min(4, G.slots - start)))
        starts.append(start)
        counts.append(count)
        slots += draw(st.lists(st.integers(0, G.slots - 1), min_size=count, max_size=count))
    return rids, starts, counts, slots


def model_record(model: dict, rid: str, start: int, slots: list[int]) -> None:
    known, length = model.get(rid, ({}, 0))
    end = start + len(slots)
    if start == 0:  # a whole row (re-)starts the request's map
        known, length = {}, end
    else:
        known = {p: s for p, s in known.items() if not length <= p < start}  # a gap: positions never reported
        length = max(end, length)
    known.update({start + i: s for i, s in enumerate(slots)})
    model[rid] = (known, length)


def model_prefix(model: dict, rid: str, limit: int) -> list[int]:
    known, length = model.get(rid, ({}, 0))
    prefix = []
    while len(prefix) < min(limit, length) and len(prefix) in known:
        prefix.append(known[len(prefix)])
    return prefix


@settings(relaxed, max_examples=150)
@given(st.lists(request_map(), max_size=8), st.lists(st.integers(0, G.slots + 4), min_size=4, max_size=4))
def test_valid_request_maps_are_answered_as_the_rules_say(maps, limits):
    store, model = holding_g(), {}
    for seq, (rids, starts, counts, slots) in enumerate(maps, start=G.num_layers):
        store.apply(hostile.req_slots(rids, starts, counts, slots, seq=seq))
        offset = 0
        for rid, start, count in zip(rids, starts, counts):
            model_record(model, rid, start, slots[offset : offset + count])
            offset += count
    assert store.counters["malformed"] == 0 and store.counters["request_maps"] == len(maps)
    header, found = store.answer(hostile.slots_query(RIDS, limits))
    counts, found = decode(header).counts, np.frombuffer(found, dtype=np.int64).tolist()
    bounds = np.cumsum((0, *counts))
    assert {rid: found[bounds[i] : bounds[i + 1]] for i, rid in enumerate(RIDS)} == \
        {rid: model_prefix(model, rid, limit) for rid, limit in zip(RIDS, limits)}


# ---- any stream: valid messages, malformed kinds, garbage and random headers mixed ----

small = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**50, 2**63 - 1, -(2**63)]))
random_geometry = st.fixed_dictionaries(dict(num_layers=small, num_kv_heads=small, head_dim=small, slots=small,
                                             itemsize=st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16])))
random_header = st.one_of(
    st.fixed_dictionaries(dict(type=st.just("KvWrite"), epoch=small, worker=small, seq=small, layer=small,
                               heads=st.lists(small, max_size=3), geometry=random_geometry, sender=small)),
    st.fixed_dictionaries(dict(type=st.just("KvDrop"), epoch=small, worker=small, seq=small,
                               heads=st.lists(small, max_size=3))),
    st.fixed_dictionaries(dict(type=st.just("ReqSlots"), epoch=small, worker=small, seq=small,
                               heads=st.lists(small, max_size=3), rids=st.lists(st.text(max_size=3), max_size=4),
                               starts=st.lists(small, max_size=4), counts=st.lists(small, max_size=4))),
    st.fixed_dictionaries(dict(type=st.just("KvFetch"), epoch=small, heads=st.lists(small, max_size=3))),
    st.fixed_dictionaries(dict(type=st.just("SlotsOfRequests"), rids=st.lists(st.text(max_size=3), max_size=4),
                               limits=st.lists(small, max_size=4))),
    st.just({"type": "StoreStats"}),
).map(msgspec.msgpack.encode)
frame = st.one_of(st.binary(max_size=256), random_header,
                  st.lists(st.integers(-5, 50), max_size=40).map(hostile.int64))
message = st.one_of(
    st.lists(frame, max_size=5),
    st.sampled_from(sorted(hostile.STREAM.values(), key=len)),
    request_map().map(lambda m: hostile.req_slots(*m)),
    st.lists(st.integers(0, G.slots - 1), min_size=1, max_size=4, unique=True).map(hostile.drop),
)


@settings(relaxed, max_examples=300)
@given(st.booleans(), st.lists(message, min_size=1, max_size=8), st.lists(message, max_size=3))
def test_the_store_survives_any_stream_and_any_request(held, stream, requests):
    store = holding_g() if held else KvStore()
    for frames in stream:
        store.apply(frames)
    for frames in requests:
        if frames:  # (a REP socket never receives a message of no frames)
            assert len(store.answer(frames)) >= 1
    assert store.counters["failed"] == 0 and all(v >= 0 for v in store.counters.values())
    if store.geometry is not None:  # whatever it accepted is a consistent shape, and bounded by it
        g = store.geometry
        assert store.valid.shape == (g.num_layers, g.num_kv_heads, g.slots) and store.generation.shape == (g.slots,)
        assert store.k.shape == store.v.shape == (*store.valid.shape, g.head_dim)
        assert store.requests.positions <= POSITIONS_PER_SLOT * g.slots
    assert msgspec.json.decode(store.answer(hostile.pack({"type": "StoreStats"}))[0])["failed"] == 0


def test_the_wire_refuses_a_struct_its_own_sender_could_not_build():
    """The bounds hold on decode only: a sender's struct is never checked against them on the way out."""
    forged = KvWrite(0, 0, 0, 0, (0, 1), Geometry(num_layers=0, num_kv_heads=1, head_dim=1, slots=1, itemsize=2))
    assert decode(encode(forged)) is None
