"""Valid messages of every channel of sglang-ft's own sockets, and named ways to break each: the malformed kinds the
fuzz tests (test_message_fuzz*.py) and the live-peer tests (test_hostile_peers.py) send.

Headers are plain dicts encoded by msgspec, not the structs, so a breakage can be anything a forger could send: a
wrong type, a missing field, an out-of-range value, frames that do not match the header. Each table maps a name
to the frames of one message that its receiver must count as malformed and drop.
"""

from __future__ import annotations

import msgspec
import numpy as np

from ft.kv_backup import Geometry
from ft.wire import MAX_PID, MAX_RID_CHARS, MAX_RIDS, MAX_STAGES, MAX_TEXT, MAX_WORKERS

G = Geometry(num_layers=2, num_kv_heads=4, head_dim=2, slots=32, itemsize=2)
GEOMETRY = msgspec.structs.asdict(G)


def int64(values) -> bytes:
    return np.asarray(values, dtype=np.int64).tobytes()


def rows(n: int, heads: int, seed: int) -> bytes:
    """K or V rows of `n` slots and `heads` heads for one layer of G, as the wire carries them."""
    return np.random.default_rng(seed).integers(0, 2**16, size=(n, heads, G.head_dim)).astype(np.uint16).tobytes()


def pack(header, *frames: bytes) -> list[bytes]:
    return [msgspec.msgpack.encode(header), *frames]


def write(slots=(1, 2), heads=(0, 4), layer=0, seq=0, worker=0, seed=0, **fields) -> list[bytes]:
    header = dict(type="KvWrite", epoch=0, worker=worker, seq=seq, layer=layer, heads=list(heads), geometry=GEOMETRY,
                  sender=0) | fields
    width = heads[1] - heads[0]
    return pack(header, int64(slots), rows(len(slots), width, seed), rows(len(slots), width, seed + 1))


def drop(slots=(2,), heads=(0, 4), seq=0, **fields) -> list[bytes]:
    return pack(dict(type="KvDrop", epoch=0, worker=0, seq=seq, heads=list(heads), sender=0) | fields, int64(slots))


def req_slots(rids=("a", "b"), starts=(0, 5), counts=(2, 1), slots=(1, 2, 3), seq=0, **fields) -> list[bytes]:
    header = dict(type="ReqSlots", epoch=0, worker=0, seq=seq, heads=[0, 4], rids=list(rids), starts=list(starts),
                  counts=list(counts), sender=0) | fields
    return pack(header, int64(slots))


def fetch(slots=(1, 2), heads=(0, 4), epoch=0, **fields) -> list[bytes]:
    return pack(dict(type="KvFetch", epoch=epoch, heads=list(heads), members=[]) | fields, int64(slots))


def slots_query(rids=("a", "b"), limits=(8, 8), **fields) -> list[bytes]:
    return pack(dict(type="SlotsOfRequests", rids=list(rids), limits=list(limits)) | fields)


def without(frames: list[bytes], field: str) -> list[bytes]:
    header = msgspec.msgpack.decode(frames[0])
    del header[field]
    return [msgspec.msgpack.encode(header), *frames[1:]]


HEARTBEAT = dict(type="Heartbeat", worker=0, pid=4242, epoch=0, seq=1)
LOAD = dict(q_heads=4, kv_heads=2, kv_tokens_used=10, kv_tokens_free=90, kv_bytes_per_token=64, running_requests=1,
            waiting_requests=0, outstanding_tokens=5, last_step_ms=3.5)
REGROUP_DONE = dict(type="RegroupDone", worker=0, epoch=1, stage_ms={"reshard_weights": 1.0}, bytes_kept=1,
                    bytes_p2p=2, bytes_reloaded=3, kv_tokens_recomputed=4)
REGROUP = dict(type="Regroup", epoch=1, workers=[0, 1], store_port=5000, cause="test",
               joining=[], pids=[11, 12])

# The backup store's write stream (PULL), with the store holding G: each is refused by a check
STREAM = {
    "request map: start 2**50": req_slots(starts=(2**50, 5)),
    "request map: start 2**63-1": req_slots(starts=(2**63 - 1, 5)),
    "request map: positions past the pool's slots": req_slots(starts=(31, 5)),
    "request map: a negative start": req_slots(starts=(-1, 5)),
    "request map: count 2**40": req_slots(counts=(2**40, 1)),
    "request map: count 2**31 (inside the wire's bound)": req_slots(counts=(2**31, 1)),
    "request map: a negative count": req_slots(counts=(-2, 1)),
    "request map: counts that do not sum to its slots": req_slots(counts=(2, 2)),
    "request map: fewer starts than rids": req_slots(starts=(0,)),
    "request map: more counts than rids": req_slots(counts=(2, 1, 0)),
    "request map: a negative slot": req_slots(slots=(1, -2, 3)),
    "request map: a slot past the pool": req_slots(slots=(1, 2, 32)),
    "request map: slot 2**50": req_slots(slots=(1, 2, 2**50)),
    "request map: a slot frame that is not int64s": [req_slots()[0], b"\x01" * 7],
    "request map: a rid too long": req_slots(rids=("a" * (MAX_RID_CHARS + 1), "b")),
    "request map: too many rids": req_slots(rids=[str(i) for i in range(MAX_RIDS + 1)], starts=[0] * (MAX_RIDS + 1),
                                            counts=[0] * (MAX_RIDS + 1), slots=()),
    "request map: a rid that is not a string": req_slots(rids=(5, "b")),
    "request map: a string start": req_slots(starts=("0", 5)),
    "request map: heads reversed": req_slots(heads=[3, 1]),
    "request map: heads past the store's": req_slots(heads=[0, 9]),
    "request map: a negative worker": req_slots(worker=-1),
    "request map: a worker past the largest group": req_slots(worker=MAX_WORKERS),
    "request map: a negative sequence number": req_slots(seq=-1),
    "request map: epoch -2": req_slots(epoch=-2),
    "request map: a negative sender": req_slots(sender=-5),
    "request map: no counts": without(req_slots(), "counts"),
    "request map: no slot frame": req_slots()[:1],
    "request map: an extra frame": req_slots() + [b""],
    "write: a geometry unlike the store's": write(geometry=GEOMETRY | {"slots": 64}),
    "write: a forged huge geometry": write(geometry=GEOMETRY | {"num_layers": 2**20, "slots": 2**40}),
    "write: a geometry of zero slots": write(geometry=GEOMETRY | {"slots": 0}),
    "write: a negative head_dim": write(geometry=GEOMETRY | {"head_dim": -2}),
    "write: 3-byte elements": write(geometry=GEOMETRY | {"itemsize": 3}),
    "write: a layer past the geometry": write(layer=2),
    "write: a negative layer": write(layer=-1),
    "write: no heads": write(heads=(2, 2)),
    "write: heads past the geometry": write(heads=(0, 5)),
    "write: a K frame too short": write()[:2] + [b"\x00" * 3, write()[3]],
    "write: a V frame too long": write()[:3] + [write()[3] + b"\x00\x00"],
    "write: a slot past the pool": write(slots=(1, 32)),
    "write: a negative slot": write(slots=(-1, 2)),
    "write: no V frame": write()[:3],
    "drop: a negative slot": drop(slots=(-3,)),
    "drop: a slot frame that is not int64s": [drop()[0], b"\x00" * 3],
    "drop: heads past the store's": drop(heads=(0, 6)),
    "drop: an extra frame": drop() + [b"x"],
    "garbage bytes": [b"\x93\xff\x00garbage"],
    "an empty header": [b""],
    "no frames at all": [],
    "a heartbeat sent to the store": pack(HEARTBEAT),
    "a fetch on the write stream": fetch(),
    "a msgpack list, not a map": pack([1, 2, 3]),
    "an unknown message type": pack({"type": "KvErase", "slots": [1]}),
}

# The backup store's fetch socket (REP): each gets a reply and is counted as malformed
REQUESTS = {
    "fetch: more slots than the pool": fetch(slots=[1] * (G.slots + 1)),
    "fetch: a slot past the pool": fetch(slots=(1, 32)),
    "fetch: a negative slot": fetch(slots=(-1,)),
    "fetch: a slot frame that is not int64s": [fetch()[0], b"\x01" * 5],
    "fetch: no slot frame": fetch()[:1],
    "fetch: a member with a negative pid": fetch(members=[[0, -1]]),
    "fetch: heads past the wire's bound": fetch(heads=(0, 2**40)),
    "slots query: more limits than rids": slots_query(limits=(1, 2, 3)),
    "slots query: a repeated rid": slots_query(rids=("a", "a")),
    "slots query: a negative limit": slots_query(limits=(-1, 8)),
    "slots query: a rid too long": slots_query(rids=("a" * (MAX_RID_CHARS + 1), "b")),
    "slots query: an extra frame": slots_query() + [b""],
    "stats: an extra frame": pack({"type": "StoreStats"}, b"x"),
    "a write on the fetch socket": write(),
    "garbage bytes": [b"\xc1\xc1"],
    "an empty frame": [b""],
}

# The controller's report socket (PULL): each is dropped before it reaches the controller's state
REPORTS = {
    "heartbeat: pid 0 (os.kill would signal a process group)": pack(HEARTBEAT | {"pid": 0}),
    "heartbeat: a negative pid": pack(HEARTBEAT | {"pid": -1}),
    "heartbeat: a pid past pid_max": pack(HEARTBEAT | {"pid": MAX_PID + 1}),
    "heartbeat: a negative worker": pack(HEARTBEAT | {"worker": -1}),
    "heartbeat: worker 2**40": pack(HEARTBEAT | {"worker": 2**40}),
    "heartbeat: epoch -2": pack(HEARTBEAT | {"epoch": -2}),
    "heartbeat: a string seq": pack(HEARTBEAT | {"seq": "1"}),
    "heartbeat: two KV backup counters": pack(HEARTBEAT | {"kv_backup": [1, 2]}),
    "heartbeat: negative KV slots": pack(HEARTBEAT | {"kv_slots": -1}),
    "heartbeat: KV slots 2**40": pack(HEARTBEAT | {"kv_slots": 2**40}),
    "heartbeat: a load of strings": pack(HEARTBEAT | {"load": {k: str(v) for k, v in LOAD.items()}}),
    "heartbeat: no pid": pack({k: v for k, v in HEARTBEAT.items() if k != "pid"}),
    "regroup done: too many stages": pack(REGROUP_DONE | {"stage_ms": {str(i): 1.0 for i in range(MAX_STAGES + 1)}}),
    "regroup done: a stage name of 100 characters": pack(REGROUP_DONE | {"stage_ms": {"s" * 100: 1.0}}),
    "regroup done: negative bytes": pack(REGROUP_DONE | {"bytes_p2p": -1}),
    "regroup done: a layout of 2 MiB": pack(REGROUP_DONE | {"layout_json": "x" * (MAX_TEXT + 1)}),
    "worker failed: a reason of 2 MiB": pack({"type": "WorkerFailed", "worker": 0, "epoch": 0,
                                             "reason": "x" * (MAX_TEXT + 1)}),
    "an order (Regroup) on the report socket": pack(REGROUP),
    "an order (BackupResync) on the report socket": pack({"type": "BackupResync", "epoch": 0, "store_pid": 1}),
    "an order (GroupLost) on the report socket": pack({"type": "GroupLost", "epoch": 0, "cause": "x"}),
    "a store message on the report socket": req_slots()[:1],
    "garbage bytes": [b"\xde\xad\xbe\xef"],
    "an empty frame": [b""],
}

# The controller's order stream (SUB in the workers, the journal and the spawner): each is dropped
ORDERS = {
    "regroup: no workers": pack(REGROUP | {"workers": [], "pids": []}),
    "regroup: a repeated worker": pack(REGROUP | {"workers": [0, 0]}),
    "regroup: a joiner outside the group": pack(REGROUP | {"joining": [5]}),
    "regroup: pids not one per worker": pack(REGROUP | {"pids": [11]}),
    "regroup: store port 70000": pack(REGROUP | {"store_port": 70000}),
    "regroup: a negative worker": pack(REGROUP | {"workers": [-1, 1]}),
    "regroup: a string epoch": pack(REGROUP | {"epoch": "2"}),
    "respawn: no KV slots": pack({"type": "Respawn", "worker": 1, "epoch": 1, "kv_slots": 0}),
    "respawn: KV slots 2**40": pack({"type": "Respawn", "worker": 1, "epoch": 1, "kv_slots": 2**40}),
    "fenced: a negative pid": pack({"type": "Fenced", "worker": 0, "epoch": 9, "pid": -1}),
    "a heartbeat on the order stream": pack(HEARTBEAT),
    "garbage bytes": [b"\x00\x01\x02"],
    "an empty frame": [b""],
}

# The controller's control socket (REP, JSON): each is answered 400 and counted as malformed
CONTROL = {
    "garbage bytes": b"\xff\xfe{",
    "a JSON list": b"[1, 2]",
    "no op": b'{"rank": 0}',
    "an op of 100 characters": b'{"op": "' + b"s" * 100 + b'"}',
    "a string rank": b'{"op": "inject", "rank": "0", "kind": "kill"}',
    "a fractional rank": b'{"op": "inject", "rank": 1.5, "kind": "kill"}',
    "a kind of 100 characters": b'{"op": "inject", "rank": 0, "kind": "' + b"k" * 100 + b'"}',
    "an empty frame": b"",
}


def kinds() -> int:
    """How many malformed kinds these tables hold, over every channel."""
    return sum(len(table) for table in (STREAM, REQUESTS, REPORTS, ORDERS, CONTROL))
