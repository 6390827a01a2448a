"""Every decoder that reads a socket, fed garbage and forged messages (hypothesis): it answers None or counts the
frame as malformed, and never raises or grows without bound."""

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ft.kv_backup import Geometry, KvDrop, KvFetch, KvWrite, StoreStats
from ft.kv_backup import decode as decode_store
from ft.kv_backup import encode as encode_store
from ft.kv_store import KvStore
from ft.messages import ControlRequest, decode_control

small = st.integers(-3, 40)
geometry = st.builds(Geometry, num_layers=small, num_kv_heads=small, head_dim=small, slots=small,
                     itemsize=st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16]))
span = st.tuples(small, small)
header = st.one_of(
    st.builds(KvWrite, epoch=small, worker=small, seq=small, layer=small, heads=span, geometry=geometry,
              sender=small),
    st.builds(KvDrop, epoch=small, worker=small, seq=small, heads=span, sender=small),
    st.builds(KvFetch, epoch=small, heads=span),
    st.just(StoreStats()),
).map(encode_store)
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI machines are busy
frame = st.one_of(st.binary(max_size=512), header,
                  st.lists(st.integers(-5, 50), max_size=40).map(lambda xs: np.array(xs, np.int64).tobytes()))


@relaxed
@given(st.binary(max_size=512))
def test_the_control_decoder_never_raises(raw):
    request = decode_control(raw)
    assert request is None or isinstance(request, ControlRequest)


@relaxed
@given(st.dictionaries(st.sampled_from(["op", "rank", "kind", "worker", "extra"]),
                       st.one_of(st.integers(), st.text(max_size=8), st.none(), st.floats(allow_nan=True))))
def test_wrong_typed_control_fields_are_refused_not_coerced(fields):
    request = decode_control(msgspec.json.encode(fields))
    if request is not None:
        assert isinstance(request.op, str) and isinstance(request.rank, int) and isinstance(request.worker, int)


@settings(relaxed, max_examples=300)
@given(st.lists(st.lists(frame, min_size=0, max_size=5), min_size=1, max_size=6))
def test_the_backup_store_survives_any_stream_of_frames(messages):
    store = KvStore()
    for frames in messages:
        store.apply(frames)  # never raises
        if isinstance(decode_store(frames[0]) if frames else None, KvFetch):
            try:  # the store's loop (serve) answers a ValueError with an empty reply
                reply = store.fetch(decode_store(frames[0]), frames[1] if len(frames) > 1 else b"")
            except ValueError:
                continue
            assert len(reply) == 4
    if store.geometry is not None:  # whatever it accepted is a consistent shape
        g = store.geometry
        assert store.valid.shape == (g.num_layers, g.num_kv_heads, g.slots)
        assert store.k.shape == store.v.shape == (*store.valid.shape, g.head_dim)
    assert all(v >= 0 for v in store.counters.values())


def test_a_geometry_larger_than_the_host_is_refused_not_allocated():
    store = KvStore()
    huge = Geometry(num_layers=1 << 10, num_kv_heads=1 << 10, head_dim=1 << 10, slots=1 << 20, itemsize=2)
    write = KvWrite(0, 0, 0, 0, (0, 1), huge)
    store.apply([encode_store(write), np.zeros(1, np.int64).tobytes(), b"", b""])
    assert store.geometry is None and store.counters["malformed"] == 1
