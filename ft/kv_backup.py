"""The KV backup wire format, and the worker side of it: a non-blocking sender and a fetch client.

Every TP worker streams the KV rows it writes to the node's backup store (`ft.kv_store`) between steps, once a
step's rows are copied to the host: one `KvWrite` per layer and step, covering the worker's KV heads and the token
slots the step wrote.
Slot numbers are SGLang's token-pool indices, identical on every TP rank, so the store keeps one host copy of
the whole group's KV keyed by (layer, global KV head, slot), whatever the partition.

Bounded and non-blocking: the sender's ZMQ queue holds at most `queue_messages` messages; when it is full (a
slow or dead store) the message is dropped at once, never blocking the forward pass, and counted. Every message
carries a per-worker sequence number, so the store sees the gap on the worker's next message and stops
trusting that worker's heads (`KvStore`); a restore then finds those blocks missing and recomputes them.

How far behind the sender is (`queued`, on every heartbeat): ZMQ does not report its queue's depth, so the sender
tracks one message per `PROBE_INTERVAL_S` (a zero-copy header frame, whose tracker is done once ZMQ wrote it
out); the oldest probe not yet written and every message after it are still queued.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Annotated, Literal

import msgspec
import numpy as np
import zmq
from msgspec import Meta

from ft.messages import msgpack_codec
from ft.sockets import connect_socket, process_keys, request
from ft.wire import (
    MAX_HEAD_DIM,
    MAX_KV_HEADS,
    MAX_KV_SLOTS,
    MAX_LAYERS,
    MAX_RID_CHARS,
    MAX_RIDS,
    MAX_WORKERS,
    Count,
    Epoch,
    PidOrUnknown,
    Positions,
    Rids,
    Worker,
)

Head = Annotated[int, Meta(ge=0, le=MAX_KV_HEADS)]
Span = tuple[Head, Head]  # [start, end) of global KV heads; the store checks start < end <= its heads
BLOCK_TOKENS = 16  # what /ft/status counts as one KV block: 16 token slots of one KV head, every layer
PROBE_INTERVAL_S = 0.05  # at most one tracked message per interval (tracking costs ~40 us a message)


class Geometry(msgspec.Struct, frozen=True):
    """The KV pool's shape for the whole group (all KV heads)."""

    num_layers: Annotated[int, Meta(ge=1, le=MAX_LAYERS)]
    num_kv_heads: Annotated[int, Meta(ge=1, le=MAX_KV_HEADS)]
    head_dim: Annotated[int, Meta(ge=1, le=MAX_HEAD_DIM)]
    slots: Annotated[int, Meta(ge=1, le=MAX_KV_SLOTS)]  # token slots, including SGLang's padding slot 0
    itemsize: Literal[1, 2, 4, 8]  # bytes per element; rows travel as raw bytes, whatever the dtype


class KvWrite(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header, slots int64, k rows [n, heads, head_dim], v rows]."""

    epoch: Epoch
    worker: Worker
    seq: Count
    layer: Annotated[int, Meta(ge=0, lt=MAX_LAYERS)]
    heads: Span
    geometry: Geometry
    sender: PidOrUnknown = 0  # the sending process (a restarted worker numbers its messages from 0 again)
    moment: Count = 0  # when in its epoch the rows were written (see `KvStreamer`'s moments)


class KvDrop(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header, slots int64]: these slots were freed; their rows for `heads` are no longer valid."""

    epoch: Epoch
    worker: Worker
    seq: Count
    heads: Span
    sender: PidOrUnknown = 0
    moment: Count = 0  # when in its epoch the slots were freed (see `KvStreamer`'s moments)


class KvFetch(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header, slots int64]. Reply: [KvFetched, k [layers, n, heads, dim], v, found bool [n]]."""

    epoch: Epoch
    heads: Span
    # (worker, process id) of `epoch`'s group: what these processes sent before the regroup still counts
    members: Annotated[tuple[tuple[Worker, PidOrUnknown], ...], Meta(max_length=MAX_WORKERS)] = ()


class KvFetched(msgspec.Struct, tag=True, frozen=True):
    found: Count
    geometry: Geometry | None


class StoreStats(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header]. Reply: JSON of the store's counters."""


class ReqSlots(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header, slots int64]: from TP rank 0 after a step, request `rids[i]`'s positions `starts[i]`..
    (`counts[i]` of them) are in the next `counts[i]` slots (ft.request_slots)."""

    epoch: Epoch
    worker: Worker
    seq: Count
    heads: Span
    rids: Rids
    starts: Positions
    counts: Positions
    sender: PidOrUnknown = 0

    def __post_init__(self):
        if not len(self.rids) == len(self.starts) == len(self.counts):
            raise ValueError(f"{len(self.rids)} rids, {len(self.starts)} starts and {len(self.counts)} counts")


class SlotsOfRequests(msgspec.Struct, tag=True, frozen=True):
    """Frames: [header]. Reply: [RequestSlotsFound, slots int64]: for each rid, the slots of its first positions
    (up to `limits[i]`) whose rows the store holds for every head and layer."""

    rids: Rids
    limits: Positions

    def __post_init__(self):
        if len(self.rids) != len(self.limits) or len(set(self.rids)) != len(self.rids):
            raise ValueError("a query needs distinct rids, one limit each")


class RequestSlotsFound(msgspec.Struct, tag=True, frozen=True):
    counts: Annotated[tuple[Count, ...], Meta(max_length=MAX_RIDS)]


StoreMessage = KvWrite | KvDrop | KvFetch | KvFetched | StoreStats | ReqSlots | SlotsOfRequests | RequestSlotsFound
encode, decode = msgpack_codec(StoreMessage)


def raw_dtype(itemsize: int) -> np.dtype:
    """A numpy dtype of `itemsize` bytes: rows are copied bit for bit (bf16 has no numpy dtype)."""
    dtypes = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
    if itemsize not in dtypes:
        raise ValueError(f"no {itemsize}-byte element type")
    return dtypes[itemsize]


class KvBackupSender:
    """Streams one worker's KV rows to the backup store without ever blocking the caller."""

    def __init__(self, endpoint: str, worker: int, queue_messages: int = 1024):
        self.worker = worker
        self.epoch = 0
        self.heads: Span = (0, 0)
        self.geometry: Geometry | None = None
        self.seq = 0
        self.sender = os.getpid()
        self.sent = self.dropped = self.bytes_sent = 0
        self._probes: deque[tuple[int, zmq.MessageTracker]] = deque()  # (index among sent messages, tracker)
        self._next_probe = 0.0
        self._socket = connect_socket(zmq.PUSH, endpoint, process_keys(), options={zmq.SNDHWM: queue_messages})

    def write(self, layer: int, slots: np.ndarray, k_rows: np.ndarray, v_rows: np.ndarray,
              heads: Span | None = None, moment: int = 0) -> bool:
        """Back up `k_rows`/`v_rows` ([n, heads, dim], raw dtype) of `slots` for this worker's heads (or `heads`:
        the remainder heads of hybrid attention, for the requests it owns), written at `moment` of the epoch (the
        store orders one slot's writes and drops from several workers by it: `ft.kv_store`)."""
        header = KvWrite(self.epoch, self.worker, self.seq, layer, heads or self.heads, self.geometry, self.sender,
                         moment)
        return self._send([encode(header), _int64(slots), np.ascontiguousarray(k_rows),
                           np.ascontiguousarray(v_rows)])

    def drop(self, slots: np.ndarray, heads: Span | None = None, moment: int = 0) -> bool:
        """Tell the store `slots` were freed at `moment` of the epoch: their rows for this worker's heads, or
        `heads`, written before then are stale."""
        header = KvDrop(self.epoch, self.worker, self.seq, heads or self.heads, self.sender, moment)
        return self._send([encode(header), _int64(slots)])

    def request_slots(self, rids, starts, counts, slots) -> bool:
        """Tell the store which slots hold these requests' positions (see `ReqSlots`). A request whose id is longer
        than the store accepts is left out (it is prefilled again if it has to move, rather than refuse the batch)."""
        slots = _int64(slots)
        if any(len(rid) > MAX_RID_CHARS for rid in rids):
            ends = np.cumsum(counts, dtype=np.int64)
            keep = [i for i, rid in enumerate(rids) if len(rid) <= MAX_RID_CHARS]
            slots = np.concatenate([slots[ends[i] - counts[i] : ends[i]] for i in keep] or [slots[:0]])
            rids, starts, counts = ([xs[i] for i in keep] for xs in (rids, starts, counts))
        header = ReqSlots(self.epoch, self.worker, self.seq, self.heads, tuple(rids), tuple(starts), tuple(counts),
                          self.sender)
        return self._send([encode(header), slots])

    def _send(self, frames) -> bool:
        self.seq += 1  # consumed even when dropped: the store sees the gap
        nbytes = sum(memoryview(f).nbytes for f in frames)
        now = time.monotonic()
        probe = None
        if now >= self._next_probe:  # the header is fresh bytes, safe to hand to ZMQ without a copy
            probe = zmq.Frame(frames[0], copy=False, track=True)
            frames = [probe, *frames[1:]]
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        self.bytes_sent += nbytes
        if probe is not None:
            self._probes.append((self.sent, probe.tracker))
            self._next_probe = now + PROBE_INTERVAL_S
        return True

    def queued(self) -> int:
        """Messages handed to ZMQ that it has not written to the store's socket yet (a lower bound: messages
        between the last probe written and the first one not written are not counted). Thread-safe against `_send`
        (the heartbeat thread asks)."""
        probes = self._probes
        while probes and probes[0][1].done:
            probes.popleft()
        return self.sent - probes[0][0] + 1 if probes else 0

    def counters(self) -> tuple[int, int, int, int]:
        """(messages sent, dropped on a full queue, bytes sent, messages still queued): what heartbeats carry."""
        return self.sent, self.dropped, self.bytes_sent, self.queued()

    def close(self) -> None:
        self._socket.close(linger=0)


def _int64(slots) -> np.ndarray:
    return np.ascontiguousarray(slots, dtype=np.int64)


class StoreUnavailable(RuntimeError):
    """The backup store did not answer in time."""


def fetch_kv(endpoint: str, epoch: int, heads: Span, slots: np.ndarray, timeout_s: float = 10.0,
             members: tuple[tuple[int, int], ...] = ()):
    """The store's rows of `heads` at `slots`: (k [layers, n, heads, dim], v, found bool [n]) in the raw dtype.

    Asking also tells the store the group moved to `epoch` with `members`: writes of older epochs are refused from
    then on, except those of the processes that stay in the group (sent before the regroup, they can arrive after
    this fetch).
    """
    frames = _ask(endpoint, [encode(KvFetch(epoch, heads, tuple(members))), _int64(slots)], timeout_s)
    if frames is None:
        raise StoreUnavailable(f"the KV backup store did not answer within {timeout_s:.0f}s")
    reply = decode(frames[0])
    n, h = len(slots), heads[1] - heads[0]
    if len(frames) != 4 or not isinstance(reply, KvFetched):
        raise StoreUnavailable("the KV backup store's reply to a fetch is malformed")
    if reply.geometry is None:
        empty = np.zeros(0, dtype=np.uint8)
        return empty, empty, np.zeros(n, dtype=bool)
    g = reply.geometry
    shape = (g.num_layers, n, h, g.head_dim)
    _, k, v, found = frames
    if not len(k) == len(v) == int(np.prod(shape)) * g.itemsize or len(found) != n:
        raise StoreUnavailable(f"the KV backup store's reply does not hold {n} slots of {h} heads")
    dtype = raw_dtype(g.itemsize)
    return (np.frombuffer(k, dtype=dtype).reshape(shape), np.frombuffer(v, dtype=dtype).reshape(shape),
            np.frombuffer(found, dtype=bool))


def slots_of_requests(endpoint: str, limits: dict[str, int], timeout_s: float = 2.0) -> dict[str, np.ndarray]:
    """Per rid, the slots of its first positions (at most `limits[rid]`) whose KV the store holds whole; an empty
    dict when the store does not answer. Ids longer than the store accepts are not asked about."""
    rids = tuple(rid for rid in limits if len(rid) <= MAX_RID_CHARS)[:MAX_RIDS]
    frames = _ask(endpoint, [encode(SlotsOfRequests(rids, tuple(max(0, limits[r]) for r in rids)))], timeout_s)
    if frames is None or len(frames) != 2:
        return {}
    reply = decode(frames[0])
    if not isinstance(reply, RequestSlotsFound) or len(reply.counts) != len(rids):
        return {}
    if len(frames[1]) != 8 * sum(reply.counts):
        return {}
    slots = np.frombuffer(frames[1], dtype=np.int64)
    bounds = np.cumsum((0, *reply.counts))
    return {rid: slots[bounds[i] : bounds[i + 1]] for i, rid in enumerate(rids)}


def store_stats(endpoint: str, timeout_s: float = 0.5) -> dict | None:
    """The store's counters, or None when it does not answer."""
    frames = _ask(endpoint, [encode(StoreStats())], timeout_s)
    try:
        stats = None if frames is None else msgspec.json.decode(frames[0])
    except msgspec.DecodeError:
        return None
    return stats if isinstance(stats, dict) else None


def _ask(endpoint: str, frames: list, timeout_s: float) -> list[bytes] | None:
    """One request to the store's REP socket and its reply frames; None when it does not answer in time."""
    return request(endpoint, frames, int(timeout_s * 1e3), process_keys())
