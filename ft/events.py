"""Fault events for orchestrators: a bounded ring with ids, replay after an id, fan-out to bounded subscribers and
a ZMQ PUB socket.

The controller records each event in an `EventLog` (its own ids) and hands them out when the HTTP server polls
(`since`), as it answers `/ft/status`. The HTTP server's `EventHub` takes every replica's events in arrival order,
numbers them once more (one id sequence for the whole server, the SSE `id:`), keeps the last `ring` of them for
clients that reconnect with `Last-Event-ID`, and offers each to every subscriber's bounded queue: a subscriber
whose queue is full is dropped and counted, never waited for, so a stalled client costs the others nothing.

Event JSON: `id`, `type`, `time` (Unix seconds), `epoch`, `dp_rank`, and the fields its type needs (EVENT_FIELDS;
docs/reference.md). No engine import here.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

RING_EVENTS = 1024  # events a reconnecting client can still get
CLIENT_QUEUE_EVENTS = 256  # events a client may fall behind (past its socket's buffers) before it is dropped
PUB_TOPIC = b"sglang_ft"  # the first frame of every message on the PUB socket (a SUB may filter on it)
MISSED = "events_missed"  # the notice a replay starts with when the ring no longer holds what the client missed

# type -> the fields it carries beside id, type, time, epoch and dp_rank
EVENT_FIELDS = {
    "worker_suspect": ("worker", "rank", "cause", "silent_ms"),
    "worker_healthy": ("worker", "rank", "cause", "silent_ms"),
    "worker_dead": ("worker", "rank", "cause", "detect_ms"),
    "worker_drained": ("worker", "rank", "cause"),
    "regroup_started": ("tp_size", "cause", "workers", "joining", "detect_ms"),
    "regroup_done": ("tp_size", "cause", "detect_ms", "recover_ms", "kv_blocks_restored", "kv_tokens_recomputed"),
    "regroup_failed": ("tp_size", "cause"),
    "worker_joined": ("worker", "rank", "tp_size"),
    "kv_backup_degraded": ("cause",),
    "kv_backup_healthy": ("cause",),
    "replica_lost": ("cause",),
}


class EventRing:
    """The last `capacity` events, each given the next id (1, 2, ...). Thread-safe."""

    def __init__(self, capacity: int = RING_EVENTS):
        if capacity <= 0:
            raise ValueError(f"an event ring holds at least one event, got {capacity}")
        self._events: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.last_id = 0

    def append(self, event: dict) -> dict:
        with self._lock:
            self.last_id += 1
            event = {"id": self.last_id, **event}
            self._events.append(event)
            return event

    def since(self, after: int | None) -> tuple[list[dict], int]:
        """The events after id `after` still held, and how many after it the ring no longer holds. An id this ring
        never gave (a previous server's) counts as knowing nothing: every event held, and all before them missed."""
        with self._lock:
            if after is None or after > self.last_id or after < 0:
                after = 0
            events = [e for e in self._events if e["id"] > after]
            oldest = events[0]["id"] if events else self.last_id + 1
            return events, oldest - after - 1


class EventLog:
    """Controller side: the events of one TP group, with the time and the replica they belong to."""

    def __init__(self, dp_rank: int | None = None, capacity: int = RING_EVENTS, clock: Callable[[], float] = time.time):
        self.ring = EventRing(capacity)
        self.dp_rank = dp_rank or 0
        self.clock = clock
        self.unservable: str | None = None  # why no group can serve now (a failed regroup, the replica lost)
        self.lost = False  # no worker left that holds the model: for good
        self._failed: set[int] = set()
        self._backup_seen = 0

    def emit(self, type_: str, epoch: int, **fields) -> dict:
        if type_ not in EVENT_FIELDS:
            raise ValueError(f"unknown event type {type_!r}")
        unknown = set(fields) - set(EVENT_FIELDS[type_])
        if unknown:
            raise ValueError(f"{type_} carries {EVENT_FIELDS[type_]}, not {sorted(unknown)}")
        event = self.ring.append({"type": type_, "time": round(self.clock(), 3), "epoch": epoch,
                                  "dp_rank": self.dp_rank, **fields})
        if type_ in ("regroup_failed", "replica_lost"):
            self.unservable = self.unservable if self.lost else fields["cause"]
            self.lost = self.lost or type_ == "replica_lost"
        elif type_ in ("regroup_started", "regroup_done") and not self.lost:
            self.unservable = None  # under way again (a regroup serves once it is done; requests wait meanwhile)
        logger.info("sglang-ft event %s", json.dumps(event))
        return event

    # --- what the controller reports, in its own terms ---

    def transition(self, worker: int, state: str, cause: str, silent_s: float, membership) -> None:
        """A worker's state changed (ft.failure_detector): suspect, dead, or healthy again."""
        group = membership.members()
        rank = group.index(worker) if worker in group else None
        if state == "dead":
            self.emit("worker_dead", membership.epoch, worker=worker, rank=rank, cause=cause,
                      detect_ms=round(silent_s * 1e3, 1))
        elif state in ("suspect", "healthy"):
            self.emit(f"worker_{state}", membership.epoch, worker=worker, rank=rank, cause=cause,
                      silent_ms=round(silent_s * 1e3, 1))

    def regroup_failed(self, epoch: int, tp_size: int, cause: str) -> None:
        """The regroup to `epoch` will not complete (once per epoch): `cause` is why, or what replaces it."""
        if epoch not in self._failed:
            self._failed.add(epoch)
            self.emit("regroup_failed", epoch, tp_size=tp_size, cause=cause)

    def regroup_done(self, recovery: dict) -> None:
        """A regroup completed (the controller's recovery record), and the restarted workers it planned in."""
        workers = recovery["workers"]
        self.emit("regroup_done", recovery["epoch"], tp_size=len(workers), cause=recovery["cause"],
                  detect_ms=recovery["detect_ms"], recover_ms=recovery["recover_ms"],
                  kv_blocks_restored=recovery["kv_blocks_restored"],
                  kv_tokens_recomputed=recovery["kv_tokens_recomputed"])
        for worker in recovery["joined"]:
            self.emit("worker_joined", recovery["epoch"], worker=worker, rank=workers.index(worker),
                      tp_size=len(workers))

    def follow_backup(self, store_events: list[dict], epoch: int) -> None:
        """The KV backup store keeper's history (`KvStoreKeeper.events`): a death degrades the backup, a restart
        makes it healthy again (the workers re-send what they hold)."""
        for entry in store_events[self._backup_seen:]:
            if entry["event"].startswith("died"):
                self.emit("kv_backup_degraded", epoch, cause=f"backup store {entry['event']}")
            elif self._backup_seen > 0:
                self.emit("kv_backup_healthy", epoch, cause=f"backup store restarted (pid {entry['pid']}); the "
                                                             "workers re-send the KV they hold")
            self._backup_seen += 1

    def answer(self, after: int, tp_size: int, launch_tp_size: int, live_workers: int,
               regrouping: int | None) -> dict:
        """The reply to the HTTP server's poll: the events after `after` (this log's ids), how many of those the
        ring lost, and whether this group can serve (`readiness`)."""
        events, missed = self.ring.since(after)
        return {"events": events, "missed": missed, "last_id": self.ring.last_id,
                "ready": readiness(self.unservable, tp_size, launch_tp_size, live_workers, regrouping)}


def readiness(unservable: str | None, tp_size: int, launch_tp_size: int, live_workers: int,
              regrouping: int | None) -> dict:
    """Whether a group can serve, with the body of `/ft/ready`: ready unless a regroup failed or every worker is
    lost; `degraded` while narrower than at launch."""
    degraded = live_workers < launch_tp_size
    if unservable is not None:
        reason = unservable
    elif regrouping is not None:
        reason = f"regrouping to epoch {regrouping}; requests wait and go on after it"
    elif degraded:
        reason = f"serving at TP {tp_size} of {launch_tp_size}"
    else:
        reason = None
    return {"ready": unservable is None, "tp_size": 0 if unservable is not None and live_workers == 0 else tp_size,
            "launch_tp_size": launch_tp_size, "live_workers": live_workers, "degraded": degraded,
            "regrouping": regrouping is not None, "reason": reason}


class Subscriber:
    """One client's bounded queue. `offer` never blocks: on a full queue the subscriber is marked dropped."""

    def __init__(self, capacity: int, wake: Callable[[], None] = lambda: None):
        self.capacity = capacity
        self.wake = wake  # called (from the publishing thread) after each offer, e.g. to set an asyncio.Event
        self.dropped = False
        self._queue: collections.deque[dict] = collections.deque()
        self._lock = threading.Lock()

    def offer(self, event: dict) -> bool:
        with self._lock:
            if self.dropped or len(self._queue) >= self.capacity:
                self.dropped = True
            else:
                self._queue.append(event)
        self.wake()
        return not self.dropped

    def take(self) -> list[dict]:
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
            return events


class EventHub:
    """HTTP-server side: one id sequence over every replica's events, the replay ring, the subscribers, and the PUB
    socket where one is configured (`publish(frames)` must not block: see `PubSocket`)."""

    def __init__(self, ring: int = RING_EVENTS, client_queue: int = CLIENT_QUEUE_EVENTS,
                 publish: Callable[[dict], None] | None = None):
        self.ring = EventRing(ring)
        self.client_queue = client_queue
        self.publish_out = publish
        self.subscribers: set[Subscriber] = set()
        self.dropped_clients = 0
        self.missed_upstream = 0  # events a controller's ring lost before this hub polled it (a stalled poller)
        self._lock = threading.Lock()

    def publish(self, event: dict) -> dict:
        """Number `event` (its controller id dropped), keep it, and hand it to every subscriber and the socket."""
        event = self.ring.append({k: v for k, v in event.items() if k != "id"})
        with self._lock:
            subscribers = list(self.subscribers)
        for subscriber in subscribers:
            if not subscriber.offer(event):
                self._drop(subscriber)
        if self.publish_out is not None:
            self.publish_out(event)
        return event

    def _drop(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self.subscribers:
                self.subscribers.discard(subscriber)
                self.dropped_clients += 1
                logger.warning("sglang-ft events: dropped a client %d events behind (%d dropped so far)",
                               subscriber.capacity, self.dropped_clients)

    def subscribe(self, last_id: int | None, wake: Callable[[], None] = lambda: None
                  ) -> tuple[Subscriber, list[dict]]:
        """A new subscriber and what it must be sent first: with `last_id` (a reconnect), the events after it still
        in the ring, preceded by a MISSED notice (no id) when some are gone. Registered before the replay is read,
        so an event published meanwhile is in both: the stream skips ids it has sent (`fresh`)."""
        subscriber = Subscriber(self.client_queue, wake)
        with self._lock:
            self.subscribers.add(subscriber)
        if last_id is None:
            return subscriber, []
        events, missed = self.ring.since(last_id)
        if missed:
            notice = {"type": MISSED, "time": round(time.time(), 3), "after": last_id, "missed": missed,
                      "oldest_id": events[0]["id"] if events else self.ring.last_id + 1}
            events = [notice, *events]
        return subscriber, events

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self.subscribers.discard(subscriber)

    def stats(self) -> dict:
        with self._lock:
            clients = len(self.subscribers)
        return {"clients": clients, "dropped_clients": self.dropped_clients, "last_id": self.ring.last_id,
                "ring": self.ring._events.maxlen, "client_queue": self.client_queue,
                "missed_upstream": self.missed_upstream}


def fresh(events: list[dict], sent_id: int) -> tuple[list[dict], int]:
    """`events` without those already sent (id <= `sent_id`), and the new last sent id; notices (no id) pass."""
    out = []
    for event in events:
        if "id" not in event:
            out.append(event)
        elif event["id"] > sent_id:
            out.append(event)
            sent_id = event["id"]
    return out, sent_id


def sse_frame(event: dict) -> bytes:
    """One Server-Sent Event: `id:` (none for a notice) and one `data:` line of JSON."""
    data = json.dumps(event, separators=(",", ":"))
    head = f"id: {event['id']}\n" if "id" in event else ""
    return f"{head}data: {data}\n\n".encode()


def parse_last_event_id(value: str | None) -> int | None:
    """The `Last-Event-ID` header as an id; None when absent; ValueError (a 400) when it is not one."""
    if value is None or value.strip() == "":
        return None
    try:
        parsed = int(value.strip())
    except ValueError:
        raise ValueError(f"Last-Event-ID must be an event id (an integer), got {value[:40]!r}") from None
    if parsed < 0:
        raise ValueError(f"Last-Event-ID must not be negative, got {parsed}")
    return parsed


class PubSocket:
    """The events on a ZMQ PUB socket (`--ft-events-endpoint`): [PUB_TOPIC, JSON] per event; over TCP with the
    deployment secret, CURVE like every sglang-ft socket (ft/sockets.py). A subscriber that cannot keep up loses
    messages past the socket's high-water mark (ZMQ's PUB semantics: never waited for); `id` shows the gap."""

    def __init__(self, endpoint: str, high_water: int = RING_EVENTS):
        import zmq

        from ft.sockets import bind_socket, process_keys

        self._zmq = zmq
        self.socket = bind_socket(zmq.PUB, endpoint, process_keys(), options={zmq.SNDHWM: high_water})
        self.endpoint = endpoint
        self.sent = 0
        self._lock = threading.Lock()  # a ZMQ socket is not thread-safe; publishers may be several threads

    def __call__(self, event: dict) -> None:
        frames = [PUB_TOPIC, json.dumps(event, separators=(",", ":")).encode()]
        with self._lock:
            try:
                self.socket.send_multipart(frames, flags=self._zmq.NOBLOCK)
                self.sent += 1
            except self._zmq.Again:  # PUB drops rather than block; this only guards a changed socket option
                pass

    def close(self) -> None:
        self.socket.close()
