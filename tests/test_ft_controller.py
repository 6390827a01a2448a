"""The FT controller's control API, driven directly (no server): status, and fault injection rules."""

import os
import subprocess
import sys
import time

import msgspec
import pytest

from ft.messages import ControlRequest, Heartbeat, encode
from sglang_ft.managers.ft_controller import FtController


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
