"""Fault events without an SGLang server: the ring and its replay, the hub's bounded subscribers, the controller's
events for a death, a drain and a lost group, and `/ft/events` over real HTTP (uvicorn) with a stalled client."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import requests

from ft.events import MISSED, EventHub, EventLog, EventRing, Subscriber, fresh, parse_last_event_id, sse_frame
from ft.messages import ControlRequest, Heartbeat, RegroupDone


def test_the_ring_replays_what_it_holds_and_counts_what_it_lost():
    ring = EventRing(4)
    for n in range(10):
        ring.append({"n": n})
    events, missed = ring.since(3)
    assert [e["id"] for e in events] == [7, 8, 9, 10] and missed == 3  # ids 4, 5, 6 are gone
    assert ring.since(8) == ([{"id": 9, "n": 8}, {"id": 10, "n": 9}], 0)
    assert ring.since(10) == ([], 0)
    events, missed = ring.since(None)
    assert [e["id"] for e in events] == [7, 8, 9, 10] and missed == 6
    events, missed = ring.since(57)  # an id this ring never gave (a previous server's): everything, all before lost
    assert [e["id"] for e in events] == [7, 8, 9, 10] and missed == 6
    with pytest.raises(ValueError):
        EventRing(0)


def test_a_reconnect_gets_a_missed_notice_then_the_events_still_held():
    hub = EventHub(ring=3, client_queue=10)
    for n in range(6):
        hub.publish({"type": "worker_suspect", "n": n, "id": 99})  # an upstream id is replaced by the hub's
    subscriber, replay = hub.subscribe(1)
    notice, *held = replay
    assert notice["type"] == MISSED and notice["missed"] == 2 and notice["oldest_id"] == 4 and "id" not in notice
    assert [e["id"] for e in held] == [4, 5, 6] and [e["n"] for e in held] == [3, 4, 5]
    assert hub.subscribe(6)[1] == [] and hub.subscribe(None)[1] == []  # up to date; a new client: live only


def test_a_full_subscriber_is_dropped_and_counted_and_the_others_get_everything():
    hub = EventHub(ring=100, client_queue=3)
    slow, _ = hub.subscribe(None)
    fast, _ = hub.subscribe(None)
    received = []
    for n in range(10):
        hub.publish({"type": "worker_suspect", "n": n})
        received += fast.take()  # the fast one keeps up
    assert [e["n"] for e in received] == list(range(10))
    assert slow.dropped and len(slow.take()) == 3 and hub.dropped_clients == 1
    assert hub.stats()["clients"] == 1 and hub.stats()["dropped_clients"] == 1
    hub.unsubscribe(fast)
    assert hub.stats()["clients"] == 0


def test_offer_never_blocks_and_wakes_the_reader():
    woken = []
    subscriber = Subscriber(2, wake=lambda: woken.append(1))
    assert subscriber.offer({"id": 1}) and subscriber.offer({"id": 2}) and not subscriber.offer({"id": 3})
    assert len(woken) == 3 and subscriber.dropped


def test_an_event_both_replayed_and_queued_is_sent_once():
    out, sent = fresh([{"id": 4}, {"type": MISSED}, {"id": 5}], 3)
    assert out == [{"id": 4}, {"type": MISSED}, {"id": 5}] and sent == 5
    assert fresh([{"id": 5}, {"id": 6}], 5) == ([{"id": 6}], 6)


def test_sse_frames_and_last_event_id():
    assert sse_frame({"id": 7, "type": "x"}) == b'id: 7\ndata: {"id":7,"type":"x"}\n\n'
    assert sse_frame({"type": MISSED}) == b'data: {"type":"events_missed"}\n\n'
    assert parse_last_event_id(None) is None and parse_last_event_id(" 12 ") == 12
    for bad in ("x", "-1", "1.5"):
        with pytest.raises(ValueError, match="Last-Event-ID"):
            parse_last_event_id(bad)


def test_the_log_refuses_unknown_types_and_fields():
    log = EventLog()
    with pytest.raises(ValueError):
        log.emit("worker_exploded", 0)
    with pytest.raises(ValueError):
        log.emit("worker_dead", 0, colour="red")


def test_backup_store_deaths_and_restarts_become_events():
    log = EventLog(dp_rank=1)
    history = [{"event": "started", "pid": 10}]
    log.follow_backup(history, 0)
    history += [{"event": "died (exit -9)", "pid": 10}, {"event": "started", "pid": 11}]
    log.follow_backup(history, 2)
    log.follow_backup(history, 2)  # nothing new
    events, _ = log.ring.since(0)
    assert [(e["type"], e["epoch"], e["dp_rank"]) for e in events] == [("kv_backup_degraded", 2, 1),
                                                                       ("kv_backup_healthy", 2, 1)]
    assert "exit -9" in events[0]["cause"] and "pid 11" in events[1]["cause"]


@pytest.fixture
def controller(tmp_path):
    from ft.partition import ModelShape
    from sglang_ft.managers.ft_controller import FtController

    controller = FtController(f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/ctl", 3, interval_s=0.05, timeout_s=0.3,
                              parent_pid=os.getpid(), enable_fault_injection=True,
                              order_endpoint=f"ipc://{tmp_path}/orders", shape=ModelShape(8, 4, 8, 64, 160, 512, 2))
    now = time.monotonic()
    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0), now)
    yield controller
    for sock in (controller.control, controller.orders):
        sock.close()
    controller.receiver.close()


def _events(controller, after=0) -> dict:
    return controller._answer(ControlRequest("events", after=after), time.monotonic())


def test_a_death_gives_worker_dead_then_regroup_started_then_done_and_readiness_follows(controller):
    controller._record(controller.state.detector.declare_dead(1, time.monotonic() + 0.4), "process exit")
    reply = _events(controller)
    assert [e["type"] for e in reply["events"]] == ["worker_dead", "regroup_started"]
    dead, started = reply["events"]
    assert (dead["worker"], dead["rank"], dead["epoch"], dead["cause"]) == (1, 1, 0, "process exit")
    assert dead["detect_ms"] >= 400 and isinstance(dead["time"], float)
    assert (started["epoch"], started["tp_size"], started["workers"]) == (1, 2, [0, 2])
    assert reply["ready"]["ready"] and reply["ready"]["regrouping"] and reply["ready"]["degraded"]
    for worker in (0, 2):
        controller._on_message(RegroupDone(worker, 1, {}, 0, 0, 0, 7), time.monotonic())
    reply = _events(controller, after=reply["last_id"])
    (done,) = reply["events"]
    assert (done["type"], done["epoch"], done["tp_size"], done["kv_tokens_recomputed"]) == ("regroup_done", 1, 2, 7)
    assert done["recover_ms"] >= 0 and done["id"] == 3
    assert reply["ready"] == {"ready": True, "tp_size": 2, "launch_tp_size": 3, "live_workers": 2, "degraded": True,
                              "regrouping": False, "reason": "serving at TP 2 of 3"}


def test_a_drain_then_losing_every_worker_leaves_no_group_that_can_serve(controller):
    assert controller._answer(ControlRequest("drain", worker=2), time.monotonic()) == {"draining": 2}
    # worker 0 dies during that regroup: it fails, replaced by one of worker 1 alone
    controller._record(controller.state.detector.declare_dead(0, time.monotonic()), "process exit")
    controller._record(controller.state.detector.declare_dead(1, time.monotonic()), "process exit")
    reply = _events(controller)
    assert [(e["type"], e["epoch"]) for e in reply["events"]] == [
        ("worker_drained", 0), ("regroup_started", 1), ("worker_dead", 1), ("regroup_failed", 1),
        ("regroup_started", 2), ("worker_dead", 2), ("regroup_failed", 2), ("replica_lost", 2)]
    assert reply["events"][0]["rank"] == 2 and reply["events"][3]["cause"] == "worker 0: process exit"
    ready = reply["ready"]
    assert not ready["ready"] and ready["tp_size"] == 0 and ready["live_workers"] == 0
    assert ready["reason"] == "worker 1: process exit"
