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
    from ft.controller import FtController

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


class _FakeController:
    """The controller's side of the poll, from an EventLog the test fills."""

    def __init__(self):
        self.log = EventLog()
        self.ready = (2, 2, 2, None)

    def ask(self, _ft, request):
        return self.log.answer(request.after, *self.ready)


@pytest.fixture
def http_events(monkeypatch):
    """`/ft/events`, `/ft/events/stats` and `/ft/ready` on a real uvicorn server, fed by a fake controller."""
    import uvicorn
    from fastapi import FastAPI

    from ft.ports import free_port
    from sglang_ft.entrypoints import ft_events
    from sglang_ft.server_args import FtArgs

    controller = _FakeController()
    feed = ft_events.EventFeed(FtArgs(), EventHub(ring=64, client_queue=512), controller.ask)
    monkeypatch.setattr(ft_events, "FEED", feed.start())
    monkeypatch.setattr(ft_events, "_sglang_ready", lambda: True)
    app = FastAPI()
    ft_events.add_event_routes(app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url, controller, feed
    feed.stop()
    server.should_exit = True
    thread.join(timeout=10)


def _wait(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sse_replays_after_last_event_id_and_streams_live_events(http_events):
    from sglang_ft.ctl_events import read_events

    url, controller, feed = http_events
    for worker in range(3):
        controller.log.emit("worker_suspect", 0, worker=worker, rank=worker, cause="missed heartbeats", silent_ms=1.0)
    _wait(lambda: feed.hub.ring.last_id == 3)
    assert requests.get(f"{url}/ft/events", headers={"Last-Event-ID": "x"}, timeout=5).status_code == 400
    with requests.get(f"{url}/ft/events", headers={"Last-Event-ID": "1"}, stream=True, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
        assert [(e["id"], e["worker"]) for e in (next(events), next(events))] == [(2, 1), (3, 2)]
        controller.log.emit("worker_dead", 0, worker=1, rank=1, cause="process exit", detect_ms=3.0)
        live = next(events)
        assert (live["id"], live["type"], live["worker"]) == (4, "worker_dead", 1)
    with requests.get(f"{url}/ft/events?last_event_id=0", stream=True, timeout=10) as response:
        assert [next(read_events(response))["id"]] == [1]


def test_ft_ready_follows_the_controllers_readiness(http_events):
    url, controller, feed = http_events
    _wait(lambda: feed.ready[0] is not None)
    response = requests.get(f"{url}/ft/ready", timeout=5)
    assert response.status_code == 200 and response.json()["degraded"] is False
    controller.ready = (0, 2, 0, None)
    controller.log.emit("replica_lost", 1, cause="worker 0: process exit")
    _wait(lambda: not feed.can_serve())
    response = requests.get(f"{url}/ft/ready", timeout=5)
    assert response.status_code == 503
    assert response.json()["reason"] == "worker 0: process exit" and response.json()["tp_size"] == 0


def test_a_stalled_client_is_dropped_and_counted_while_another_gets_every_event(http_events):
    """The stalled client reads nothing with a tiny window; once its socket's buffers and its queue are full it
    is dropped (counted); a reading client gets every event in order meanwhile."""
    from sglang_ft.ctl_events import read_events

    url, controller, feed = http_events
    port = int(url.rsplit(":", 1)[1])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)  # keeps the server's send buffer small too
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(b"GET /ft/events HTTP/1.1\r\nHost: x\r\n\r\n")
    _wait(lambda: feed.hub.stats()["clients"] == 1)
    received = []

    def read():
        with requests.get(f"{url}/ft/events", stream=True, timeout=30) as response:
            for event in read_events(response):
                received.append(event["id"])
                if len(received) == total:
                    return

    total = 1500  # ~0.45 MB of events: far past what the stalled socket's buffers hold (~80 kB)
    reader = threading.Thread(target=read)
    reader.start()
    _wait(lambda: feed.hub.stats()["clients"] == 2)
    for n in range(total):
        controller.log.emit("worker_suspect", 0, worker=n, rank=None, cause="x" * 200, silent_ms=0.0)
        if n % 50 == 49:
            time.sleep(0.12)  # the controller's ring holds 1024: let the feed poll (every 0.1 s)
    reader.join(timeout=60)
    assert received == list(range(1, total + 1))
    stats = requests.get(f"{url}/ft/events/stats", timeout=5).json()
    assert stats["dropped_clients"] == 1 and stats["last_id"] == total and stats["missed_upstream"] == 0
    stalled.close()


def test_the_pub_socket_is_curve_keyed_with_the_deployment_secret(tmp_path):
    import zmq

    from ft.events import PubSocket
    from ft.ports import free_port
    from ft.sockets import connect_socket, load_keys, refused_connections, use_secret_file

    secret = tmp_path / "secret"
    secret.write_text("a deployment secret of enough bytes")
    use_secret_file(str(secret))
    try:
        pub = PubSocket(f"tcp://127.0.0.1:{free_port()}")
        keyed = connect_socket(zmq.SUB, pub.endpoint, load_keys(str(secret)))
        plain = connect_socket(zmq.SUB, pub.endpoint)
        refused = refused_connections()
        time.sleep(0.5)  # subscriptions reach the publisher
        pub({"id": 1, "type": "worker_dead"})
        assert keyed.poll(5000) and keyed.recv_multipart() == [b"sglang_ft", b'{"id":1,"type":"worker_dead"}']
        assert not plain.poll(500) and refused_connections() > refused and pub.sent == 1
    finally:
        use_secret_file("")
        for sock in (keyed, plain):
            sock.close()
        pub.close()


def test_a_dead_workers_gauges_leave_the_metrics_directory_and_its_counters_stay(tmp_path, monkeypatch):
    from ft.metrics import MULTIPROC_DIR, FtMetrics

    monkeypatch.setenv(MULTIPROC_DIR, str(tmp_path))
    names = ["gauge_mostrecent_4242.db", "gauge_all_4242.db", "counter_4242.db", "histogram_4242.db",
             "gauge_mostrecent_42420.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    FtMetrics.forget_process(4242)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_mostrecent_42420.db",
                                                           "histogram_4242.db"]
    FtMetrics.forget_process(None)  # a worker that never registered a pid


def test_ctl_events_follows_the_stream_from_an_id_and_names_an_unreachable_server(http_events):
    import io

    from ft.ports import free_port
    from sglang_ft.ctl import main
    from sglang_ft.ctl_events import follow

    url, controller, feed = http_events
    for worker in range(3):
        controller.log.emit("worker_dead", 0, worker=worker, rank=worker, cause="process exit", detect_ms=1.0)
    _wait(lambda: feed.hub.ring.last_id == 3)
    out = io.StringIO()
    assert follow(url, None, last_id=1, count=2, out=out) == 0
    assert [(e["id"], e["worker"]) for e in map(json.loads, out.getvalue().splitlines())] == [(2, 1), (3, 2)]
    assert main(["events", "--url", f"http://127.0.0.1:{free_port()}", "--count", "1"]) == 2
