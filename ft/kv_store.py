"""The KV backup store: one process per node holding every KV head's rows in host memory, fed over ZMQ.

Workers stream `KvWrite`/`KvDrop` messages (see `ft.kv_backup`) into a PULL socket; a regroup fetches the rows of
the heads it lost over a REP socket. The store answers a fetch only after applying every write already queued, so
a restore sees all KV the group committed before the failure.

What it trusts: a row is valid from its write until a drop of its slot (the slot was freed), a gap in the writing
worker's sequence numbers (a message was dropped on a full queue: that worker's heads are invalidated whole), or
a write of an older epoch than the newest fetch from a process that left the group (a fenced worker's late
message, refused). A gap invalidates every head span that sending process ever wrote, not only the span of the
message that revealed it: one process writes several (its TP heads and hybrid attention's remainder heads, and other
heads after a regroup), and the lost message may have covered any of them. A process that stays in the group
keeps its older writes: the regroup's fetch can overtake what it sent just before (its drops while parking
requests), and refusing those would invalidate all its heads.

Writes and drops are ordered by when they happened, not by when they arrive. One head's rows of one slot can come
from several workers over separate sockets, which ZMQ reads in no set order: hybrid attention's remainder rows (each
request's on its owner, its slots freed by their holders) and cyclic placement's, and a worker that held a head
before a regroup and sent its last rows late. Every message carries its (epoch, moment) (`KvStreamer`'s moments:
the same on every rank of a group); a drop invalidates only rows written before it, and a write older than the
slot's latest drop or latest write is refused. Ordered by arrival, a holder's drop overtaken by the next owner's
write lost that row (recomputed at the next regroup), and an old holder's late write brought a freed row back to
life (restored into a request that never had it).

It also keeps which slots hold each running request's tokens, as the group's TP rank 0 reports them after each
step (`ft.request_slots`): a data-parallel replica that loses every worker is gone with its schedulers, and this
map is what lets another replica take over its requests' KV rather than prefill them again.

Run: `python -m ft.kv_store --push ipc://... --fetch ipc://... --parent-pid N` (the FT controller does).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import msgspec
import numpy as np
import psutil
import zmq

from ft.kv_backup import (
    BLOCK_TOKENS,
    Geometry,
    KvDrop,
    KvFetch,
    KvFetched,
    KvWrite,
    ReqSlots,
    RequestSlotsFound,
    SlotsOfRequests,
    StoreStats,
    decode,
    encode,
    raw_dtype,
)
from ft.process_watch import ProcessWatch
from ft.request_slots import RequestSlotMap
from ft.sockets import bind_socket, process_keys, refused_connections, use_secret_file
from ft.wire import Dropped, Malformed

logger = logging.getLogger("sglang_ft.kv_store")


class KvStore:
    """The store's state and rules, apart from its sockets (unit-tested directly)."""

    def __init__(self):
        self.geometry: Geometry | None = None
        self.k = self.v = self.valid = None
        self.epoch = 0
        self.staying: set[tuple[int, int]] = set()  # (worker, sending process) of the group at `epoch`
        self.next_seq: dict[tuple[int, int], int] = {}  # (worker, sending process) -> next sequence number
        self.spans_sent: dict[tuple[int, int], set[tuple[int, int]]] = {}  # (worker, sending process) -> heads
        self.started = time.monotonic()
        self.requests = RequestSlotMap()  # which slots hold each request's tokens (moving it to another group)
        self.generation = None  # per slot: how many times it was dropped (a map naming it is stale after one)
        self.written_at = None  # per (layer, head, slot): the (epoch, moment) of the row held (`when`)
        self.dropped_at = None  # per (head, slot): the (epoch, moment) of its latest drop
        self.counters = dict(writes=0, drops=0, fetches=0, rows_fetched=0, rows_missing=0, stale_refused=0,
                             sequence_gaps=0, malformed=0, failed=0, bytes_received=0, request_maps=0,
                             request_queries=0, late_rows_refused=0)
        self.dropped = Dropped(logger, "kv store", self.counters)  # counts into `malformed` and `failed`

    def apply(self, frames: list[bytes]) -> None:
        """Apply one message from a worker's stream; anything malformed is counted and dropped. Never raises: the
        store's loop applies every message it receives."""
        self.counters["bytes_received"] += sum(len(f) for f in frames)
        try:
            header = decode(frames[0]) if frames else None
            if isinstance(header, KvWrite) and len(frames) == 4:
                self._write(header, *frames[1:])
            elif isinstance(header, KvDrop) and len(frames) == 2:
                self._drop(header, frames[1])
            elif isinstance(header, ReqSlots) and len(frames) == 2:
                self._record_requests(header, frames[1])
            else:
                raise Malformed(f"not a write, drop or request map ({len(frames)} frames)")
        except Malformed as exc:
            self.dropped.refused(str(exc))
        except Exception as exc:
            self.dropped.raised(exc)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one request of the fetch socket. Never raises: a malformed or failing request gets an
        empty fetch reply, since a REP socket takes no next request before it has answered this one."""
        try:
            request = decode(frames[0])
            if isinstance(request, KvFetch) and len(frames) == 2:
                return self.fetch(request, frames[1])
            if isinstance(request, SlotsOfRequests) and len(frames) == 1:
                return self.request_slots(request)
            if isinstance(request, StoreStats) and len(frames) == 1:
                return [msgspec.json.encode(self.stats())]
            raise Malformed(f"not a fetch, request-slots or stats query ({len(frames)} frames)")
        except Malformed as exc:
            self.dropped.refused(str(exc))
        except Exception as exc:
            self.dropped.raised(exc)
        return [encode(KvFetched(0, None)), b"", b"", b""]

    def _accept(self, epoch: int, worker: int, seq: int, heads, sender: int = 0) -> bool:
        if epoch < self.epoch and (worker, sender) not in self.staying:
            self.counters["stale_refused"] += 1
            return False
        expected = self.next_seq.get((worker, sender))  # a restarted worker (a new sender) starts again at 0
        self.next_seq[(worker, sender)] = seq + 1
        spans = self.spans_sent.setdefault((worker, sender), set())
        spans.add((int(heads[0]), int(heads[1])))
        if expected is not None and seq != expected and self.valid is not None:
            self.counters["sequence_gaps"] += 1
            for start, end in spans:  # a lost message could have covered any of these heads' slots
                self.valid[:, start:end] = False
            logger.warning("kv store: worker %d skipped messages %d..%d; its heads %s are no longer backed up",
                           worker, expected, seq - 1, sorted(spans))
        return True

    def _slots(self, raw: bytes, g: Geometry | None = None) -> np.ndarray:
        """The int64 slots of a frame, each inside the pool of `g` (the store's geometry by default) once known."""
        g = g or self.geometry
        if len(raw) % 8:
            raise Malformed(f"a slot frame of {len(raw)} B is not int64s")
        slots = np.frombuffer(raw, dtype=np.int64)
        if g is not None and slots.size and (slots.min() < 0 or slots.max() >= g.slots):
            raise Malformed(f"a slot outside the pool's [0, {g.slots})")
        return slots

    def _heads(self, heads, g: Geometry | None = None, empty: bool = False) -> tuple[int, int]:
        """A span of global KV heads inside `g` (the store's geometry by default, once known); empty only where
        `empty` (a drop or a request map of a rank whose span is empty)."""
        g = g or self.geometry
        h0, h1 = heads
        if h1 < h0 or (h1 == h0 and not empty) or (g is not None and h1 > g.num_kv_heads):
            raise Malformed(f"heads {h0}..{h1} outside the store's {g.num_kv_heads if g else '?'} KV heads")
        return h0, h1

    def _write(self, header: KvWrite, slots_raw: bytes, k_raw: bytes, v_raw: bytes) -> None:
        g = header.geometry
        if self.geometry is not None and g != self.geometry:
            raise Malformed(f"geometry {g} differs from the store's {self.geometry}")
        h0, h1 = self._heads(header.heads, g)
        if header.layer >= g.num_layers:
            raise Malformed(f"layer {header.layer} of {g.num_layers}")
        slots = self._slots(slots_raw, g)
        shape = (len(slots), h1 - h0, g.head_dim)
        if not len(k_raw) == len(v_raw) == int(np.prod(shape)) * g.itemsize:
            raise Malformed(f"K and V frames of {len(k_raw)} and {len(v_raw)} B for {len(slots)} slots' rows")
        if self.geometry is None:
            self._allocate(g)
        if not self._accept(header.epoch, header.worker, header.seq, header.heads, header.sender):
            return
        dtype = raw_dtype(g.itemsize)
        k = np.frombuffer(k_raw, dtype=dtype).reshape(shape).transpose(1, 0, 2)  # [heads, n, dim]
        v = np.frombuffer(v_raw, dtype=dtype).reshape(shape).transpose(1, 0, 2)
        at = when(header.epoch, header.moment)
        layer = header.layer
        # not older than the slot's latest drop (else a freed slot's late row) nor than the row held (drops happen
        # at odd moments, writes at even ones: no tie between them, except in unstamped messages, taken in order)
        newer = (at >= self.dropped_at[h0:h1, slots]) & (at >= self.written_at[layer][h0:h1, slots])
        if newer.all():  # the usual case: the whole block at once
            self._put(layer, (slice(h0, h1), slots), k, v, at)
        else:
            self.counters["late_rows_refused"] += int((~newer).sum())
            heads, index = np.nonzero(newer)
            self._put(layer, (heads + h0, slots[index]), k[heads, index], v[heads, index], at)
        self.counters["writes"] += 1

    def _put(self, layer: int, where: tuple, k: np.ndarray, v: np.ndarray, at: int) -> None:
        """Hold rows `k`, `v` at `where` ((heads, slots) of `layer`), written at `at`."""
        self.k[layer][where], self.v[layer][where] = k, v
        self.valid[layer][where] = True
        self.written_at[layer][where] = at

    def _drop(self, header: KvDrop, slots_raw: bytes) -> None:
        h0, h1 = self._heads(header.heads, empty=True)
        slots = self._slots(slots_raw)
        if not self._accept(header.epoch, header.worker, header.seq, header.heads, header.sender) or self.valid is None:
            return
        at = when(header.epoch, header.moment)
        self.dropped_at[h0:h1, slots] = np.maximum(self.dropped_at[h0:h1, slots], at)
        self.valid[:, h0:h1, slots] &= self.written_at[:, h0:h1, slots] > at  # a later owner's row stays
        self.generation[slots] += 1
        self.counters["drops"] += 1

    def _record_requests(self, header: ReqSlots, slots_raw: bytes) -> None:
        """(Its rids, starts and counts are as many, and not negative: `ReqSlots` is checked as it is decoded.)"""
        self._heads(header.heads, empty=True)
        slots = self._slots(slots_raw)
        if sum(header.counts) != len(slots):
            raise Malformed(f"a request map of {sum(header.counts)} positions with {len(slots)} slots")
        g = self.geometry  # a request holds a slot per position: it never has more positions than the pool slots
        if g is not None and any(start + count > g.slots for start, count in zip(header.starts, header.counts)):
            raise Malformed(f"a request's positions beyond the pool's {g.slots} slots")
        if not self._accept(header.epoch, header.worker, header.seq, header.heads, header.sender) or g is None:
            return
        offset = 0
        for rid, start, count in zip(header.rids, header.starts, header.counts):
            self.requests.record(rid, start, slots[offset : offset + count], self.generation)
            offset += count
        self.counters["request_maps"] += 1

    def request_slots(self, query: SlotsOfRequests) -> list[bytes]:
        """Reply frames: per rid, the slots of its first positions whose rows the store holds for every head."""
        self.counters["request_queries"] += 1
        if self.geometry is not None:  # (distinct rids, one limit each: checked as `SlotsOfRequests` is decoded)
            whole = self.valid.all(axis=(0, 1))
            found = [self.requests.trusted_prefix(rid, limit, self.generation, whole)
                     for rid, limit in zip(query.rids, query.limits)]
        else:
            found = [np.empty(0, dtype=np.int64) for _ in query.rids]
        return [encode(RequestSlotsFound(tuple(len(f) for f in found))),
                np.concatenate(found) if found else np.empty(0, dtype=np.int64)]

    def _allocate(self, g: Geometry) -> None:
        """(Every size of `g` is at least 1: `Geometry` is checked as it is decoded.)"""
        dtype = raw_dtype(g.itemsize)
        needed = 2 * g.num_layers * g.num_kv_heads * g.slots * g.head_dim * g.itemsize
        if needed > psutil.virtual_memory().available:  # a forged or mistaken geometry must not exhaust the host
            raise Malformed(f"geometry {g} needs {needed} B, more than this host has free")
        self.geometry = g
        self.k = np.zeros((g.num_layers, g.num_kv_heads, g.slots, g.head_dim), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.valid = np.zeros((g.num_layers, g.num_kv_heads, g.slots), dtype=bool)
        self.generation = np.zeros(g.slots, dtype=np.int64)
        self.written_at = np.zeros((g.num_layers, g.num_kv_heads, g.slots), dtype=np.int64)  # 8 B per row of
        self.dropped_at = np.zeros((g.num_kv_heads, g.slots), dtype=np.int64)  # 2 x head_dim x itemsize B
        logger.info("kv store: holding %d layers x %d KV heads x %d slots (%.1f MiB)", g.num_layers,
                    g.num_kv_heads, g.slots, 2 * self.k.nbytes / 2**20)

    def fetch(self, request: KvFetch, slots_raw: bytes) -> list[bytes]:
        """Reply frames for a fetch; it also moves the store to the request's epoch and its members."""
        slots = self._slots(slots_raw)
        if self.geometry is not None and len(slots) > self.geometry.slots:  # the reply's rows would outgrow the store
            raise Malformed(f"a fetch of {len(slots)} slots from a pool of {self.geometry.slots}")
        if request.epoch > self.epoch:
            self.staying = {(worker, sender) for worker, sender in request.members}
        self.epoch = max(self.epoch, request.epoch)
        self.counters["fetches"] += 1
        h0, h1 = request.heads
        if self.geometry is None or not 0 <= h0 < h1 <= self.geometry.num_kv_heads:
            self.counters["rows_missing"] += len(slots)
            return [encode(KvFetched(0, None)), b"", b"", np.zeros(len(slots), dtype=bool).tobytes()]
        k = np.ascontiguousarray(self.k[:, h0:h1, slots].transpose(0, 2, 1, 3))
        v = np.ascontiguousarray(self.v[:, h0:h1, slots].transpose(0, 2, 1, 3))
        found = self.valid[:, h0:h1, slots].all(axis=(0, 1))
        self.counters["rows_fetched"] += int(found.sum())
        self.counters["rows_missing"] += int((~found).sum())
        return [encode(KvFetched(int(found.sum()), self.geometry)), k, v, found.tobytes()]

    def stats(self) -> dict:
        held = 0 if self.valid is None else int(self.valid.all(axis=0).sum())
        g = self.geometry
        return {
            **self.counters,
            "epoch": self.epoch,
            "requests_mapped": len(self.requests),
            "blocks_held": -(-held // BLOCK_TOKENS),
            "bytes_held": 0 if g is None else held * 2 * g.num_layers * g.head_dim * g.itemsize,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "refused_connections": refused_connections(),  # peers without the deployment's key (ft/sockets.py)
        }


EPOCH_BITS, MOMENT_BITS = 22, 40


def when(epoch: int, moment: int) -> int:
    """(epoch, moment) as one ordered int64 (an epoch past 4 million regroups, or a moment past 2^40, counts as the
    last one: a forged header cannot overflow it)."""
    return min(max(epoch, 0), (1 << EPOCH_BITS) - 1) << MOMENT_BITS | min(moment, (1 << MOMENT_BITS) - 1)


def serve(push_endpoint: str, fetch_endpoint: str, parent_pid: int) -> None:
    """The store's loop: apply writes as they come; before answering a fetch, apply every write already queued."""
    pull = bind_socket(zmq.PULL, push_endpoint, process_keys())
    rep = bind_socket(zmq.REP, fetch_endpoint, process_keys())
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(rep, zmq.POLLIN)
    store = KvStore()
    logger.info("kv store: listening on %s (writes) and %s (fetches)", push_endpoint, fetch_endpoint)
    parent = ProcessWatch()
    while not parent.gone(parent_pid):
        events = dict(poller.poll(200))
        if pull in events or rep in events:
            _drain(pull, store)
        if rep in events:
            rep.send_multipart(store.answer(rep.recv_multipart()))


def _drain(pull, store: KvStore) -> None:
    while True:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        store.apply(frames)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sglang-ft KV backup store (started by the FT controller)")
    parser.add_argument("--push", required=True, help="ZMQ endpoint the workers stream KV to")
    parser.add_argument("--fetch", required=True, help="ZMQ endpoint a regroup fetches KV from")
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process exits")
    parser.add_argument("--secret-file", default="", help="key its TCP endpoints with this deployment secret (CURVE)")
    args = parser.parse_args(argv)
    use_secret_file(args.secret_file)
    os.nice(10)  # background work: yield the cores to the forward passes it protects
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s KV] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    serve(args.push, args.fetch, args.parent_pid)


if __name__ == "__main__":
    main()
