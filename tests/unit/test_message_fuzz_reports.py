"""The controller's report and control sockets, and the order stream's three subscribers (a worker's listener, the
tokenizer's journal, the launcher's spawner), fed every malformed kind of tests/hostile_messages.py and any
well-typed message hypothesis builds: each is handled, or counted and dropped by a check (never by the
last-resort catch), and every loop goes on. The backup store's sockets: test_message_fuzz.py."""

import os
import time
from types import SimpleNamespace

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang_ft.entrypoints import worker_spawner
from sglang_ft.managers.tokenizer_manager_components.sent_requests import ReplicaOrders, RequestJournal

from tests import hostile_messages as hostile
from ft.agent import OrderListener
from ft.controller import FtController
from ft.messages import (ControlRequest, GroupLost, Heartbeat, Regroup, RegroupDone, Respawn, WorkerFailed,
                         WorkerLoad, decode_control, decode_order, decode_report, encode)
from ft.partition import ModelShape, TPLayout
from ft.wire import MAX_KV_SLOTS, MAX_PID

relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SHAPE = ModelShape(8, 4, 8, 64, 160, 512, 2)


@pytest.fixture
def controller(tmp_path):
    made = FtController(f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/ctl", 3, interval_s=0.05, timeout_s=0.3,
                        parent_pid=os.getpid(), enable_fault_injection=False, order_endpoint=f"ipc://{tmp_path}/o",
                        shape=SHAPE)
    yield made
    for socket in (made.control, made.orders):
        socket.close()
    made.receiver.close()


def answers_status(controller: FtController) -> bool:
    return "epoch" in msgspec.json.decode(controller.reply(b'{"op": "status"}', time.monotonic()))


# ---- the report socket: well-typed reports of any content reach the handler, which never fails on one ----

counts = st.integers(0, 2**40)
ms = st.floats(0, 1e6)
workers = st.integers(0, 4)  # the group has 3: 3 and 4 are strangers
epochs = st.integers(-1, 3)
loads = st.none() | st.builds(WorkerLoad, **{f: counts for f in (
    "q_heads", "kv_heads", "kv_tokens_used", "kv_tokens_free", "kv_bytes_per_token", "running_requests",
    "waiting_requests", "outstanding_tokens")}, last_step_ms=ms, last_step_collective_ms=st.none() | ms)
layouts = st.one_of(st.text(max_size=20), st.just('{"shards": 5}'), st.just(TPLayout.even(SHAPE, 2).to_json()),
                    st.just(TPLayout.even(ModelShape(8, 2, 8, 64, 160, 512, 2), 2).to_json()))
reports = st.one_of(
    st.builds(Heartbeat, worker=workers, pid=st.integers(1, MAX_PID), epoch=epochs, seq=counts,
              kv_backup=st.none() | st.tuples(counts, counts, counts), joining=st.booleans(),
              kv_slots=st.integers(0, MAX_KV_SLOTS), kv_backup_queued=counts, serving=st.booleans(), load=loads),
    st.builds(WorkerFailed, worker=workers, epoch=epochs, reason=st.text(max_size=20), pid=st.integers(0, MAX_PID)),
    st.builds(RegroupDone, worker=workers, epoch=epochs, stage_ms=st.dictionaries(st.text(max_size=8), ms,
              max_size=4), bytes_kept=counts, bytes_p2p=counts, bytes_reloaded=counts, kv_tokens_recomputed=counts,
              layout_json=layouts),
)


@settings(relaxed, max_examples=150)
@given(st.lists(reports, max_size=12))
def test_the_controller_handles_any_well_typed_report_without_failing(controller, messages):
    for message in messages:
        decoded = decode_report(encode(message))  # what the loop's receiver hands on
        assert decoded == message
        controller.handle_report(decoded, time.monotonic())
    controller.step()  # the sweep, process exits, recoveries, what the reports set in motion
    assert controller.dropped.failed == 0 and answers_status(controller)


def test_a_garbled_layout_in_every_members_report_leaves_the_planned_one(controller):
    """Before, TPLayout.from_json raised inside the loop with the recovery half recorded: the controller died."""
    now = time.monotonic()
    for worker in range(3):
        controller.handle_report(Heartbeat(worker, os.getpid(), 0, 0), now)
    controller._record(controller.state.detector.declare_dead(1, now), "process exit")
    planned = controller.layout
    for worker, layout in ((0, "{not json"), (2, "{not json")):
        controller.handle_report(RegroupDone(worker, 1, {}, 0, 0, 0, 0, layout_json=layout), now)
    assert controller.pending is None and controller.layout == planned and len(controller.state.recoveries) == 1
    assert controller.dropped.failed == 0 and answers_status(controller)


@pytest.mark.parametrize("name", hostile.REPORTS)
def test_every_malformed_report_is_refused_as_it_is_decoded(name):
    (frame,) = hostile.REPORTS[name]
    assert decode_report(frame) is None


# ---- the control socket ----

@pytest.mark.parametrize("name", hostile.CONTROL)
def test_every_malformed_control_request_is_answered_400_and_counted(controller, name):
    reply = msgspec.json.decode(controller.reply(hostile.CONTROL[name], time.monotonic()))
    assert reply["code"] == 400 and controller.dropped.malformed == 1 and controller.dropped.failed == 0
    assert answers_status(controller)


@settings(relaxed, max_examples=200)
@given(st.one_of(st.binary(max_size=64), st.dictionaries(
    st.sampled_from(["op", "rank", "kind", "worker", "extra"]),
    st.one_of(st.sampled_from(["status", "inject", "rejoin", "drain", "kill"]), st.integers(-2**70, 2**70),
              st.text(max_size=8), st.none(), st.floats(allow_nan=True))).map(msgspec.json.encode)))
def test_any_control_request_gets_an_answer_and_never_a_failure(controller, raw):
    reply = msgspec.json.decode(controller.reply(raw, time.monotonic()))
    assert isinstance(reply, dict) and reply.get("code", 200) in (200, 400, 403, 409)
    assert controller.dropped.failed == 0
    request = decode_control(raw)  # what was accepted has the declared types, nothing coerced
    assert request is None or (isinstance(request, ControlRequest) and isinstance(request.rank, int))


# ---- the order stream, through each subscriber's real socket loop ----

def publisher(tmp_path):
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"ipc://{tmp_path}/orders")
    return socket


def publish_until(socket, frames, done, timeout_s: float = 10.0) -> None:
    """Publish `frames` once the subscriber is connected (a first probe got through), then wait for `done()`."""
    deadline = time.monotonic() + timeout_s
    for frame in frames:
        socket.send(frame)
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert done()


REGROUP = Regroup(2, (0, 1), 5000, "test", pids=(11, 12))
ORDER_FRAMES = [frame for frame, in hostile.ORDERS.values()]


def test_a_workers_order_listener_drops_every_malformed_order_and_takes_the_next_valid_one(tmp_path):
    socket = publisher(tmp_path)
    listener = OrderListener(f"ipc://{tmp_path}/orders", worker=0, current_epoch=lambda: 0)
    probe = encode(Regroup(1, (0,), 5000, "probe"))
    publish_until(socket, [], lambda: socket.send(probe) or listener.latest is not None)
    publish_until(socket, [*ORDER_FRAMES, encode(REGROUP)], lambda: listener.latest == REGROUP)
    assert listener.dropped.malformed == len(ORDER_FRAMES) and listener.dropped.failed == 0
    socket.close()


def test_the_journal_drops_every_malformed_order_and_follows_the_next_valid_one():
    journal, seen, switched = RequestJournal(), ReplicaOrders(0), []
    journal._on_loop = switched.append
    for frame in ORDER_FRAMES:  # among them a Regroup of no workers: before, workers[0] raised in its thread
        journal.on_order(seen, frame)
    journal.on_order(seen, encode(Regroup(3, (1, 0), 5000, "rank 0 died")))
    journal.on_order(seen, encode(GroupLost(3, "gone")))  # (a single replica: nothing to move it to)
    assert seen.dropped.malformed == len(ORDER_FRAMES) and seen.dropped.failed == 0
    assert (seen.epoch, seen.leader, len(switched)) == (3, 1, 1)


def test_the_spawner_drops_malformed_orders_and_restarts_of_workers_it_never_had(tmp_path, monkeypatch):
    spawned = []
    launch = worker_spawner.LaunchArgs(SimpleNamespace(tp_size=2, base_gpu_id=0, gpu_id_step=1), None, None)
    monkeypatch.setattr(worker_spawner, "_LAUNCH", launch)
    monkeypatch.setattr(worker_spawner.WorkerSpawner, "spawn", lambda self, order: spawned.append(order))
    socket = publisher(tmp_path)
    spawner = worker_spawner.WorkerSpawner(f"ipc://{tmp_path}/orders")
    probe = encode(Respawn(0, 0, 64))
    publish_until(socket, [], lambda: socket.send(probe) or spawned)
    stranger, valid = Respawn(7, 1, 64), Respawn(1, 1, 64)
    publish_until(socket, [*ORDER_FRAMES, encode(stranger), encode(valid)], lambda: valid in spawned)
    assert spawner.dropped.malformed == len(ORDER_FRAMES) + 1 and stranger not in spawned
    socket.close()


@pytest.mark.parametrize("respawn", [True, False])
def test_under_respawn_the_first_regroup_starts_the_fork_server_once(tmp_path, monkeypatch, respawn):
    """A failure makes a restart likely: under --ft-respawn the fork server starts importing then, not when the
    restart is ordered. Without --ft-respawn only an operator's rejoin starts it."""
    spawned, prepared = [], []
    launch = worker_spawner.LaunchArgs(SimpleNamespace(tp_size=2, base_gpu_id=0, gpu_id_step=1), None, None)
    monkeypatch.setattr(worker_spawner, "_LAUNCH", launch)
    monkeypatch.setattr(worker_spawner.WorkerSpawner, "spawn", lambda self, order: spawned.append(order))
    monkeypatch.setattr(worker_spawner, "prepare_restarts", lambda: prepared.append(len(spawned)))
    socket = publisher(tmp_path)
    worker_spawner.WorkerSpawner(f"ipc://{tmp_path}/orders", prepare_at_first_regroup=respawn)
    publish_until(socket, [], lambda: socket.send(encode(Respawn(0, 0, 64))) or spawned)
    later = Respawn(1, 1, 64)
    publish_until(socket, [encode(REGROUP), encode(REGROUP), encode(later)], lambda: later in spawned)
    assert prepared == ([len(spawned) - 1] if respawn else [])  # once, at the first regroup, before the restart
    socket.close()


@pytest.mark.parametrize("name", hostile.ORDERS)
def test_every_malformed_order_is_refused_as_it_is_decoded(name):
    (frame,) = hostile.ORDERS[name]
    assert decode_order(frame) is None
