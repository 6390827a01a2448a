"""The FT controller's control API, driven directly (no server): status, and fault injection rules."""

import contextlib
import os
import subprocess
import sys
import time

import msgspec
import pytest

from ft.controller import FtController
from ft.messages import ControlRequest, Heartbeat


@pytest.fixture
def controller_factory(tmp_path):
    made = []

    def make(enable_fault_injection: bool, workers: int = 2) -> FtController:
        controller = FtController(f"ipc://{tmp_path}/hb{len(made)}", f"ipc://{tmp_path}/ctl{len(made)}", workers,
                                  interval_s=0.05, timeout_s=0.5, parent_pid=os.getpid(),
                                  enable_fault_injection=enable_fault_injection)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.receiver.close()
        controller.control.close()


def test_fault_injection_is_refused_unless_enabled(controller_factory):
    controller = controller_factory(enable_fault_injection=False)
    reply = controller._answer(ControlRequest("inject", rank=0, kind="kill"), time.monotonic())
    assert reply["code"] == 403 and "--ft-enable-fault-injection" in reply["error"]


def test_bad_control_requests_get_4xx(controller_factory):
    controller = controller_factory(enable_fault_injection=True)
    now = time.monotonic()
    assert controller._answer(None, now)["code"] == 400
    assert controller._answer(ControlRequest("reboot"), now)["code"] == 400
    assert controller._answer(ControlRequest("inject", rank=5, kind="kill"), now)["code"] == 400
    assert controller._answer(ControlRequest("inject", rank=0, kind="melt"), now)["code"] == 400
    assert controller._answer(ControlRequest("inject", rank=0, kind="kill"), now)["code"] == 409  # no pid yet


def test_status_follows_heartbeats_and_process_exit(controller_factory):
    controller = controller_factory(enable_fault_injection=True)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        controller._on_message(Heartbeat(0, os.getpid(), 0, 0), time.monotonic())
        controller._on_message(Heartbeat(1, victim.pid, 0, 0), time.monotonic())
        status = controller.state.status(time.monotonic())
        assert (status["epoch"], status["tp_size"], status["live_workers"]) == (0, 2, 2)
        assert [(w["rank"], w["pid"], w["state"]) for w in status["workers"]] == [
            (0, os.getpid(), "healthy"), (1, victim.pid, "healthy")]
        reply = controller._answer(ControlRequest("inject", rank=1, kind="kill"), time.monotonic())
        assert reply == {"injected": "kill", "rank": 1, "worker": 1, "pid": victim.pid}
        victim.wait(timeout=10)
        controller._on_message(Heartbeat(0, os.getpid(), 0, 1), time.monotonic())
        controller.step()
        status = controller.state.status(time.monotonic())
        assert status["workers"][1]["state"] == "dead" and status["live_workers"] == 1
        assert status["detections"][-1]["cause"] == "process exit"
    finally:
        victim.kill()


def test_status_shows_each_workers_kv_backup_counters_from_its_heartbeats(controller_factory):
    controller = controller_factory(enable_fault_injection=False)
    controller._on_message(Heartbeat(0, os.getpid(), 0, 0, (120, 3, 4096)), time.monotonic())
    controller._on_message(Heartbeat(1, os.getpid(), 0, 0), time.monotonic())
    first, second = controller.state.status(time.monotonic())["workers"]
    assert (first["kv_backup_sent"], first["kv_backup_dropped"], first["kv_backup_bytes"]) == (120, 3, 4096)
    assert "kv_backup_sent" not in second
    assert controller.state.status(time.monotonic())["kv_backup"] == {"state": "off"}


def test_an_old_epoch_is_fenced(controller_factory):
    controller = controller_factory(enable_fault_injection=False)
    controller.state.membership.regroup((0,))
    controller._on_message(Heartbeat(1, 123, 0, 0), time.monotonic())
    status = controller.state.status(time.monotonic())
    assert status["fenced_messages"] == 1 and status["workers"][1]["pid"] is None


def test_status_json_is_served_over_the_control_socket(controller_factory):
    import zmq

    controller = controller_factory(enable_fault_injection=False)
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.connect(controller.control.getsockopt_string(zmq.LAST_ENDPOINT))
    socket.send(b'{"op": "status"}')
    deadline = time.monotonic() + 5
    while not socket.poll(10) and time.monotonic() < deadline:
        controller.step()
    assert msgspec.json.decode(socket.recv())["tp_size"] == 2
    socket.close()


def _shape():
    from ft.partition import ModelShape

    return ModelShape(8, 4, 8, 64, 160, 512, 2)


@contextlib.contextmanager
def _ordering_controller(tmp_path, tp_size: int, interval_s: float = 0.05, timeout_s: float = 0.3, **kwargs):
    """A controller that publishes orders, and a subscriber to them; closed after."""
    import zmq

    kwargs.setdefault("enable_fault_injection", False)
    controller = FtController(f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/ctl", tp_size, interval_s=interval_s,
                              timeout_s=timeout_s, parent_pid=os.getpid(), order_endpoint=f"ipc://{tmp_path}/orders",
                              shape=_shape(), **kwargs)
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(f"ipc://{tmp_path}/orders")
    time.sleep(0.2)  # let the subscription reach the publisher
    try:
        yield controller, subscriber
    finally:
        subscriber.close()
        for socket in (controller.control, controller.orders):
            socket.close()
        controller.receiver.close()


@pytest.fixture
def orchestrating_controller(tmp_path):
    with _ordering_controller(tmp_path, 3) as pair:
        yield pair


def _published(subscriber, kind):
    """The messages of type `kind` the controller published (others read and skipped)."""
    from ft.messages import decode

    found = []
    while subscriber.poll(200):
        message = decode(subscriber.recv())
        if isinstance(message, kind):
            found.append(message)
    return found


def _orders(subscriber):
    from ft.messages import Regroup

    return _published(subscriber, Regroup)


def test_a_dead_member_gets_a_regroup_order_of_the_survivors(orchestrating_controller):
    """The order names the group; its members plan the migration (tests/unit/test_regroup_plan.py)."""
    from ft.messages import RegroupDone

    controller, subscriber = orchestrating_controller
    now = time.monotonic()
    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0), now)
    change = controller.state.detector.declare_dead(1, now)
    controller._record(change, "process exit")
    (order, *_) = _orders(subscriber)
    assert (order.epoch, order.workers, order.cause) == (1, (0, 2), "worker 1: process exit")
    for worker in (0, 2):
        controller._on_message(RegroupDone(worker, 1, {"reshard_weights": 1.0}, 10, 20, 30, 40), time.monotonic())
    (recovery,) = controller.state.recoveries
    assert recovery["epoch"] == 1 and recovery["bytes_p2p"] == 40 and recovery["bytes_reloaded"] == 60
    assert recovery["kv_tokens_recomputed"] == 40 and controller.pending is None


def test_a_late_stage_joins_its_recovery_whenever_it_arrives(orchestrating_controller):
    """The graphs' re-capture ends after serving resumed: its time joins the recovery's stages (the slowest
    worker's), whether it arrives after the recovery was recorded or before the last worker's RegroupDone."""
    from ft.messages import LateStageDone, RegroupDone

    controller, _ = orchestrating_controller
    now = time.monotonic()
    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0), now)
    controller._record(controller.state.detector.declare_dead(1, now), "process exit")
    controller._on_message(RegroupDone(0, 1, {"reshard_weights": 1.0}, 10, 20, 30, 40), time.monotonic())
    controller._on_message(LateStageDone(0, 1, "recapture_graphs", 800.0), time.monotonic())  # early
    controller._on_message(RegroupDone(2, 1, {"reshard_weights": 2.0}, 10, 20, 30, 40), time.monotonic())
    (recovery,) = controller.state.recoveries
    assert recovery["stage_ms"] == {"reshard_weights": 2.0, "recapture_graphs": 800.0}
    controller._on_message(LateStageDone(2, 1, "recapture_graphs", 950.5), time.monotonic())  # late, slower
    controller._on_message(LateStageDone(0, 1, "recapture_graphs", 10.0), time.monotonic())
    assert recovery["stage_ms"] == {"reshard_weights": 2.0, "recapture_graphs": 950.5}
    controller._on_message(LateStageDone(2, 0, "recapture_graphs", 5.0), time.monotonic())  # no such recovery
    assert controller.state.recoveries == [recovery]


def test_a_failed_collective_with_everyone_alive_rebuilds_the_same_group(orchestrating_controller):
    from ft.messages import WorkerFailed

    controller, subscriber = orchestrating_controller
    controller._on_message(WorkerFailed(0, 0, "Timed out waiting 2000ms"), time.monotonic())
    deadline = time.monotonic() + 5
    while controller.pending is None and time.monotonic() < deadline:
        for worker in range(3):  # everyone keeps beating: nobody is dead
            controller._on_message(Heartbeat(worker, os.getpid(), 0, 1), time.monotonic())
        controller.step()
    (order, *_) = _orders(subscriber)
    assert order.workers == (0, 1, 2) and order.epoch == 1 and "every worker alive" in order.cause


def test_a_regroup_that_failed_on_its_members_is_ordered_again(orchestrating_controller):
    """Found by the chaos soak: a regroup failed on both members (a gloo timeout), nobody died, and with no newer
    order the members gave up after 120 s and the server lost its last workers."""
    from ft.messages import WorkerFailed

    controller, subscriber = orchestrating_controller
    now = time.monotonic()
    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0), now)
    controller._record(controller.state.detector.declare_dead(1, now), "process exit")
    (first, *_) = _orders(subscriber)
    assert first.epoch == 1 and controller.pending is not None
    controller._on_message(WorkerFailed(0, 1, "regroup to epoch 1 failed: Timed out waiting 2000ms"),
                           time.monotonic())
    deadline = time.monotonic() + 5
    while controller.pending.order.epoch == 1 and time.monotonic() < deadline:
        for worker in (0, 2):  # the members keep beating: nobody else died
            controller._on_message(Heartbeat(worker, os.getpid(), 1, 1), time.monotonic())
        controller.step()
    order = controller.pending.order
    assert (order.epoch, order.workers) == (2, (0, 2)) and "regroup to epoch 1 failed" in order.cause


def _respawns(subscriber):
    from ft.messages import Respawn

    return _published(subscriber, Respawn)


@pytest.fixture
def respawning_controller(tmp_path):
    import zmq

    from ft.respawn import RespawnPolicy

    def make(automatic: bool, enable_fault_injection: bool = True):
        controller = FtController(f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/ctl", 3, interval_s=0.05,
                                  timeout_s=0.3, parent_pid=os.getpid(),
                                  enable_fault_injection=enable_fault_injection,
                                  order_endpoint=f"ipc://{tmp_path}/orders", shape=_shape(),
                                  respawn=RespawnPolicy(automatic=automatic, delay_s=0.0))
        subscriber = zmq.Context.instance().socket(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(f"ipc://{tmp_path}/orders")
        time.sleep(0.2)
        made.append((controller, subscriber))
        return controller, subscriber

    made = []
    yield make
    for controller, subscriber in made:
        subscriber.close()
        for socket in (controller.control, controller.orders):
            socket.close()
        controller.receiver.close()


def _lose_worker_1(controller):
    """Three members beat (with their KV pool size), worker 1 dies, the survivors finish the regroup."""
    from ft.messages import RegroupDone

    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0, kv_slots=4096), time.monotonic())
    controller._record(controller.state.detector.declare_dead(1, time.monotonic()), "process exit")
    for worker in (0, 2):
        controller._on_message(RegroupDone(worker, 1, {}, 0, 0, 0, 0), time.monotonic())
    assert controller.pending is None and controller.state.membership.members() == (0, 2)


def test_a_dead_worker_is_restarted_and_ordered_back_into_the_group(respawning_controller):
    """(What the joiner receives from whom is the members' plan: tests/unit/test_regroup_plan.py.)"""
    from ft.messages import RegroupDone

    controller, subscriber = respawning_controller(automatic=True)
    _lose_worker_1(controller)
    controller.step()
    (respawn,) = _respawns(subscriber)
    assert (respawn.worker, respawn.epoch, respawn.kv_slots) == (1, 1, 4096)
    assert controller.state.status(time.monotonic())["workers"][1]["state"] == "joining"
    # the restarted process has initialised: it beats as joining, and is planned in (last, so rank 0 stays)
    controller._on_message(Heartbeat(1, os.getpid(), -1, 0, joining=True, kv_slots=4096), time.monotonic())
    controller.step()
    order = [o for o in _orders(subscriber) if o.epoch == 2][0]
    assert order.workers == (0, 2, 1) and order.joining == (1,) and order.cause == "rejoin of worker 1"
    assert controller.state.status(time.monotonic())["workers"][1]["state"] == "joining"  # until it is done
    for worker in (0, 2, 1):
        controller._on_message(RegroupDone(worker, 2, {}, 0, 0, 0, 0), time.monotonic())
        controller._on_message(Heartbeat(worker, os.getpid(), 2, 1), time.monotonic())
    status = controller.state.status(time.monotonic())
    assert status["tp_size"] == 3 and status["recoveries"][-1]["joined"] == [1]
    assert [w["state"] for w in status["workers"]] == ["healthy"] * 3
    assert status["respawns"][0]["worker"] == 1 and status["respawns"][0]["attempt"] == 1


def test_a_joining_beat_from_a_worker_nobody_restarted_is_not_admitted(respawning_controller):
    controller, subscriber = respawning_controller(automatic=False)
    _lose_worker_1(controller)
    controller._on_message(Heartbeat(1, 4242, -1, 0, joining=True), time.monotonic())
    controller.step()
    assert controller.state.fenced_messages == 1 and controller.pending is None
    assert _respawns(subscriber) == [] and controller.state.membership.members() == (0, 2)


def test_rejoin_by_hand_is_an_admin_operation_and_checks_the_worker(respawning_controller):
    controller, subscriber = respawning_controller(automatic=False, enable_fault_injection=False)
    _lose_worker_1(controller)
    now = time.monotonic()
    assert controller._answer(ControlRequest("rejoin", worker=1), now)["code"] == 403
    controller.enable_fault_injection = True
    assert controller._answer(ControlRequest("rejoin", worker=7), now)["code"] == 400
    assert controller._answer(ControlRequest("rejoin", worker=0), now)["code"] == 409  # healthy
    assert controller._answer(ControlRequest("rejoin", worker=1), now) == {"rejoining": 1}
    controller.step()
    (respawn,) = _respawns(subscriber)
    assert respawn.worker == 1
    assert controller._answer(ControlRequest("rejoin", worker=1), time.monotonic())["code"] == 409  # joining


def test_a_restart_that_dies_before_it_is_ready_is_dead_again_and_retried(respawning_controller):
    controller, subscriber = respawning_controller(automatic=True)
    _lose_worker_1(controller)
    controller.step()
    assert [r.attempt for r in _respawns(subscriber)] == [1]
    victim = subprocess.Popen([sys.executable, "-c", "pass"])
    victim.wait(timeout=30)
    controller.state.membership.workers[1].pid = victim.pid  # the restarted process, which exited
    controller.step()
    controller.step()
    assert [r.attempt for r in _respawns(subscriber)] == [2]
    assert any(d["cause"] == "restart failed" for d in controller.state.detections)


def test_draining_a_worker_regroups_without_it_and_only_a_rejoin_brings_it_back(respawning_controller):
    from ft.messages import RegroupDone

    controller, subscriber = respawning_controller(automatic=True)
    for worker in range(3):
        controller._on_message(Heartbeat(worker, os.getpid(), 0, 0, kv_slots=4096), time.monotonic())
    now = time.monotonic()
    assert controller._answer(ControlRequest("drain", worker=5), now)["code"] == 400
    assert controller._answer(ControlRequest("drain", worker=1), now) == {"draining": 1}
    (order,) = _orders(subscriber)
    assert order.workers == (0, 2) and order.cause == "drain of worker 1"
    assert controller._answer(ControlRequest("drain", worker=0), now)["code"] == 409  # a regroup is under way
    for worker in (0, 2):
        controller._on_message(RegroupDone(worker, 1, {}, 0, 0, 0, 0), time.monotonic())
    assert controller.state.detections[-1]["cause"] == "drained"
    controller.step()
    assert _respawns(subscriber) == []  # an operator's drain is not undone automatically
    assert controller._answer(ControlRequest("drain", worker=1), time.monotonic())["code"] == 409  # not a member
    assert controller._answer(ControlRequest("rejoin", worker=1), time.monotonic()) == {"rejoining": 1}
    controller.step()
    assert [r.worker for r in _respawns(subscriber)] == [1]


def test_the_controller_process_cleans_up_its_runtime_dir_when_terminated(tmp_path, tiny_model):
    """Started as the launcher starts it; a stopped server (SIGTERM to its group) leaves no sockets behind."""
    import signal

    from ft.controller import spawn_controller
    from ft.messages import ControlRequest
    from sglang_ft.server_args import FtArgs

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    ft = FtArgs(enabled=True, kv_backup=False, runtime_dir=str(runtime))
    proc = spawn_controller(ft.controller_options(2, tiny_model), os.getpid())
    try:
        from sglang_ft.entrypoints.ft_runtime import ask_controller

        deadline = time.monotonic() + 60
        while "workers" not in (reply := ask_controller(ft, ControlRequest("status"))):
            assert time.monotonic() < deadline and proc.poll() is None, reply
        assert len(reply["workers"]) == 2 and any(runtime.iterdir())  # serving on its sockets
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not runtime.exists()
    finally:
        proc.kill()


def test_a_silent_node_leaves_in_one_regroup_and_its_pids_are_not_signalled(tmp_path):
    """TP 4 over two nodes, the controller on node 0 (workers 0, 1): node 1's workers stop beating together. The
    first to time out takes its silent node-mate with it, one regroup; their pids belong to another machine."""
    node0 = _ordering_controller(tmp_path, 4, enable_fault_injection=True, local_workers=range(2))
    with node0 as (controller, subscriber):
        for worker in range(4):
            controller._on_message(Heartbeat(worker, os.getpid(), 0, 0, serving=True), time.monotonic())
        reply = controller._answer(ControlRequest("inject", rank=3, kind="kill"), time.monotonic())
        assert reply["code"] == 409 and "another node" in reply["error"]
        time.sleep(0.1)
        controller._on_message(Heartbeat(2, os.getpid(), 0, 1, serving=True), time.monotonic())  # 2 beats later
        deadline = time.monotonic() + 5
        while controller.state.membership.epoch == 0 and time.monotonic() < deadline:
            for worker in (0, 1):  # node 0 keeps beating
                controller._on_message(Heartbeat(worker, os.getpid(), 0, 2, serving=True), time.monotonic())
            controller.step()
        (order,) = _orders(subscriber)
        assert order.workers == (0, 1) and order.cause == "worker 3: heartbeat timeout"
        assert {d["worker"] for d in controller.state.detections if d["state"] == "dead"} == {2, 3}


def test_a_silent_worker_its_peer_is_blocked_on_is_dead_before_the_timeout(tmp_path):
    """Worker 2 stops beating while worker 0 reports one iteration running on (waiting in a collective for it) and
    worker 1 beats idle: worker 2 is declared dead by the blocked peer (once blocked a quarter of the timeout and a
    normal iteration), long before the 2 s timeout, and regrouped out with that cause; the status shows how long
    worker 0 has been blocked."""
    with _ordering_controller(tmp_path, 3, interval_s=0.2, timeout_s=2.0) as (controller, subscriber):
        started = time.monotonic()
        for worker in range(3):
            controller._on_message(Heartbeat(worker, os.getpid(), 0, 0, serving=True), started)
        while controller.state.membership.epoch == 0 and time.monotonic() - started < 5:
            now = time.monotonic()
            controller._on_message(Heartbeat(0, os.getpid(), 0, 1, serving=True, step_running_s=now - started), now)
            controller._on_message(Heartbeat(1, os.getpid(), 0, 1, serving=True), now)
            controller.step()
        declared = time.monotonic() - started
        (order,) = _orders(subscriber)
        assert order.workers == (0, 1)
        assert order.cause.startswith("worker 2: hang confirmed by a blocked peer (worker 0 blocked ")
        assert declared < 1.0, f"declared after {declared:.2f} s"
        detection = controller.state.detections[-1]
        assert (detection["worker"], detection["state"]) == (2, "dead") and "blocked peer" in detection["cause"]
        workers = controller.state.status(time.monotonic())["workers"]
        assert workers[0]["step_running_ms"] >= controller.state.detector.blocked_after_s * 1e3
        assert workers[1]["step_running_ms"] is None  # idle


def test_a_group_left_without_a_node_0_worker_is_not_formed(tmp_path, caplog):
    """Rank 0 must stay on node 0 (the tokenizer's IPC and the rendezvous are there): when node 0's workers die and
    node 1's live, no group of node-1 workers is ordered."""
    with _ordering_controller(tmp_path, 4, local_workers=range(2)) as (controller, subscriber):
        for worker in range(4):
            controller._on_message(Heartbeat(worker, os.getpid(), 0, 0, serving=True), time.monotonic())
        for worker in (0, 1):
            assert controller.state.detector.declare_dead(worker, time.monotonic())
        with caplog.at_level("ERROR"):
            controller.start_recovery("workers 0, 1: process exit", 0.0)
        assert controller.pending is None and controller.state.membership.epoch == 0
        assert _orders(subscriber) == []
        assert "no worker left alive on node 0" in caplog.text
