"""The FT agent (ft/agent.py) with a fake engine, over real ZMQ sockets: a failed collective is reported, the
controller's orders are delivered, the engine's regroup runs once per order however often the controller re-publishes
it, a failed regroup waits for the next order, and older epochs and other workers' fences change nothing."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from ft.agent import Engine, FtAgent, RegroupOrdered
from ft.heartbeat import MessageReceiver
from ft.messages import Fenced, Heartbeat, Regroup, RegroupDone, WorkerFailed, WorkerLoad, encode
from ft.options import AgentOptions
from ft.sockets import bind_socket

LOAD = WorkerLoad(q_heads=4, kv_heads=2, kv_tokens_used=3, kv_tokens_free=5, kv_bytes_per_token=8,
                  running_requests=1, waiting_requests=0, outstanding_tokens=7, last_step_ms=1.5)


class PeerLost(Exception):
    """What the fake engine's collectives raise when a peer vanishes."""


class FakeEngine:
    """Regroups as told: `fail_epochs` fail like a collective would; every call is recorded."""

    def __init__(self, fail_epochs=()):
        self.fail_epochs = set(fail_epochs)
        self.regroups: list[int] = []
        self.interrupts: list[int] = []

    def regroup(self, order: Regroup) -> RegroupDone:
        self.regroups.append(order.epoch)
        if order.epoch in self.fail_epochs:
            raise PeerLost(f"a peer left during the regroup to epoch {order.epoch}")
        return RegroupDone(0, order.epoch, {"stage": 1.0}, 0, 0, 0, 0)

    def callbacks(self) -> Engine:
        return Engine(regroup=self.regroup, is_collective_failure=lambda exc: isinstance(exc, (PeerLost,
                                                                                                 RegroupOrdered)),
                      interrupt=lambda order: self.interrupts.append(order.epoch), load=lambda: LOAD)


def _order(epoch: int, workers=(0, 2)) -> Regroup:
    return Regroup(epoch=epoch, workers=workers, store_port=0, cause="worker 1: process exit")


@pytest.fixture
def runtime(tmp_path):
    """(controller's PULL receiver, controller's PUB socket, make_agent(engine) -> agent, fences seen)."""
    receiver = MessageReceiver(f"ipc://{tmp_path}/hb")
    publisher = bind_socket(zmq.PUB, f"ipc://{tmp_path}/orders")
    fences: list[tuple[int, int]] = []

    def make(engine: FakeEngine) -> FtAgent:
        options = AgentOptions(0, f"ipc://{tmp_path}/hb", f"ipc://{tmp_path}/orders", heartbeat_interval_s=0.02,
                               order_wait_s=30.0)
        return FtAgent(options, engine.callbacks(), on_fenced=lambda worker, epoch: fences.append((worker, epoch)))

    yield receiver, publisher, make, fences
    receiver.close()
    publisher.close()


def _wait_for(receiver: MessageReceiver, seen: list, predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen += receiver.poll(0.05)
        found = [m for m in seen if predicate(m)]
        if found:
            return found[0]
    raise AssertionError(f"nothing matched among {len(seen)} messages")


def test_a_failed_collective_is_reported_and_the_engine_regroups_once_per_order(runtime):
    receiver, publisher, make, fences = runtime
    engine = FakeEngine(fail_epochs={1})  # the first ordered regroup fails too: the next order is awaited
    agent = make(engine)
    served, current = [], {"order": None}
    stop = threading.Event()

    def serve():
        served.append(agent.epoch)
        if len(served) == 1:
            raise PeerLost("all_reduce: peer 1 closed the connection")
        return "served"

    def controller():  # re-publishes the pending order, as the FT controller does until every member is done
        while not stop.wait(0.02):
            if current["order"] is not None:
                publisher.send(encode(current["order"]))

    threading.Thread(target=controller, daemon=True).start()
    result = {}
    loop = threading.Thread(target=lambda: result.setdefault("run", agent.run(serve)), daemon=True)
    loop.start()
    try:
        seen: list = []
        failed = _wait_for(receiver, seen, lambda m: isinstance(m, WorkerFailed))
        assert (failed.worker, failed.epoch) == (0, 0) and "peer 1 closed" in failed.reason
        current["order"] = _order(1)
        failed_regroup = _wait_for(receiver, seen, lambda m: isinstance(m, WorkerFailed) and m.epoch == 1)
        assert "regroup to epoch 1 failed" in failed_regroup.reason
        time.sleep(0.2)  # epoch 1 is re-published meanwhile: it is not tried again
        current["order"] = _order(2)
        done = _wait_for(receiver, seen, lambda m: isinstance(m, RegroupDone))
        loop.join(timeout=20)
        time.sleep(0.2)  # the agent is back serving while epoch 2 is still re-published
    finally:
        stop.set()
    assert result == {"run": "served"} and served == [0, 2]
    assert engine.regroups == [1, 2] and (done.worker, done.epoch) == (0, 2)
    assert engine.interrupts == [1, 2]  # each newer order interrupts the old group once
    assert agent.epoch == 2 and fences == []
    agent.check_orders()  # the order it formed is no reason to leave the loop
    beat = _wait_for(receiver, seen, lambda m: isinstance(m, Heartbeat) and m.epoch == 2)
    assert (beat.worker, beat.serving, beat.load) == (0, True, LOAD)


def test_only_a_newer_order_leaves_the_loop_and_only_a_newer_epoch_fences(runtime):
    _, _, make, fences = runtime
    engine = FakeEngine()
    agent = make(engine)
    agent.orders.handle(encode(_order(0, workers=(1, 2))))  # not newer than its epoch: nothing happens
    agent.orders.handle(encode(Fenced(worker=0, epoch=0)))
    agent.orders.handle(encode(Fenced(worker=1, epoch=5)))  # another worker's fence
    agent.check_orders()
    assert fences == [] and engine.interrupts == [] and agent.orders.latest is not None
    agent.orders.handle(encode(_order(3, workers=(0, 1))))
    with pytest.raises(RegroupOrdered):
        agent.check_orders()
    assert engine.interrupts == [3] and engine.regroups == []  # the regroup runs in the loop, not the listener
    agent.orders.handle(encode(Fenced(worker=0, epoch=1)))  # newer than its epoch (0): it was replaced
    agent.orders.handle(encode(_order(4, workers=(1, 2))))  # a newer group without it
    assert fences == [(0, 1), (0, 4)]
    agent.orders.handle(b"not an order")
    assert agent.orders.dropped.malformed == 1
