"""Heartbeats, the failure detector, epochs and fencing (ft/): unit tests and real killed/stopped processes."""

import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ft.failure_detector import FailureDetector
from ft.heartbeat import MessageReceiver
from ft.membership import Membership, WorkerState
from ft.messages import Heartbeat, Regroup, WorkerFailed, decode, encode
from ft.wire import MAX_PID, MAX_WORKERS


def test_silence_makes_a_worker_suspect_then_dead():
    membership = Membership.initial(2)
    detector = FailureDetector(membership, interval_s=0.1, timeout_s=1.0)
    detector.beat(0, 100, now=0.0)
    detector.beat(1, 101, now=0.0)
    assert detector.sweep(now=0.1) == []
    detector.beat(0, 100, now=0.25)
    changes = detector.sweep(now=0.25)
    assert [(c.worker, c.state) for c in changes] == [(1, WorkerState.SUSPECT)]
    detector.beat(0, 100, now=0.9)
    assert [(c.worker, c.state) for c in detector.sweep(now=1.0)] == [(1, WorkerState.DEAD)]
    assert membership.live_members() == (0,)


def test_a_suspect_that_beats_again_is_healthy_but_the_dead_stay_dead():
    membership = Membership.initial(1)
    detector = FailureDetector(membership, interval_s=0.1, timeout_s=1.0)
    detector.beat(0, 1, now=0.0)
    detector.sweep(now=0.5)
    assert membership.workers[0].state is WorkerState.SUSPECT
    detector.beat(0, 1, now=0.6)
    assert membership.workers[0].state is WorkerState.HEALTHY
    detector.declare_dead(0, now=0.7)
    assert detector.beat(0, 1, now=0.8) is None
    assert membership.workers[0].state is WorkerState.DEAD


def test_the_longest_gap_a_worker_recovered_from_is_kept_per_process():
    membership = Membership.initial(2)
    detector = FailureDetector(membership, interval_s=0.1, timeout_s=1.0)
    for now in (0.0, 0.1, 0.7, 0.8):  # one 0.6 s gap: suspect, then healthy again
        detector.beat(0, 100, now)
        detector.sweep(now)
    assert membership.workers[0].max_beat_gap_s == pytest.approx(0.6)
    assert membership.workers[0].state is WorkerState.HEALTHY
    detector.beat(1, 101, now=0.0)
    detector.beat(1, 202, now=0.9)  # a new process: its first beat is no gap of the old one's
    assert membership.workers[1].max_beat_gap_s == 0.0


def test_a_starting_worker_gets_the_startup_bound_then_the_timeout_once_serving():
    membership = Membership.initial(2)
    detector = FailureDetector(membership, interval_s=0.2, timeout_s=1.0)
    assert detector.startup_timeout_s == 10.0  # 5 timeouts, at least 10 s
    detector.beat(0, 100, now=0.0, serving=False)  # loading weights, first forward: long GIL holds
    detector.beat(1, 101, now=0.0, serving=False)
    assert [(c.worker, c.state) for c in detector.sweep(now=3.0)] == [(0, WorkerState.SUSPECT),
                                                                      (1, WorkerState.SUSPECT)]
    detector.beat(0, 100, now=3.0, serving=True)  # worker 0 finished a batch; worker 1 is still starting
    assert membership.workers[0].max_beat_gap_s == 0.0  # a startup gap is not the serving timeout's margin
    assert [(c.worker, c.state) for c in detector.sweep(now=4.0)] == [(0, WorkerState.DEAD)]
    assert [(c.worker, c.state) for c in detector.sweep(now=10.0)] == [(1, WorkerState.DEAD)]


def test_regroup_bumps_the_epoch_and_fences_the_old_one():
    membership = Membership.initial(4)
    assert membership.is_current(0)
    assert membership.regroup((0, 1, 3)) == 1
    assert not membership.is_current(0) and membership.is_current(1)
    assert membership.members() == (0, 1, 3)
    with pytest.raises(ValueError):
        membership.regroup(())


def test_interval_must_be_below_timeout():
    with pytest.raises(ValueError, match="interval"):
        FailureDetector(Membership.initial(1), interval_s=1.0, timeout_s=0.5)


@given(st.binary(max_size=256))
def test_decoder_never_raises_on_garbage(frame):
    message = decode(frame)
    assert message is None or isinstance(message, (Heartbeat, WorkerFailed, Regroup))


@given(st.integers(0, MAX_WORKERS - 1), st.integers(1, MAX_PID), st.integers(-1, 2**31), st.integers(0, 2**31))
def test_heartbeats_round_trip(worker, pid, epoch, seq):  # (out of these bounds: tests/test_message_fuzz.py)
    message = Heartbeat(worker, pid, epoch, seq)
    assert decode(encode(message)) == message


SENDER = """
import sys, time
from ft.heartbeat import HeartbeatSender
HeartbeatSender(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])).start()
time.sleep(600)
"""
INTERVAL, TIMEOUT = 0.05, 0.6


@pytest.fixture
def controller(tmp_path):
    endpoint = f"ipc://{tmp_path}/hb.sock"
    receiver = MessageReceiver(endpoint)
    membership = Membership.initial(2)
    detector = FailureDetector(membership, INTERVAL, TIMEOUT)
    senders = [subprocess.Popen([sys.executable, "-c", SENDER, endpoint, str(w), str(INTERVAL)],
                                cwd=os.getcwd()) for w in range(2)]

    def pump(seconds, until=None):
        """Run the controller loop for up to `seconds`; returns (transitions, fenced heartbeats)."""
        transitions, fenced = [], []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in receiver.poll(INTERVAL / 2):
                if not membership.is_current(message.epoch):
                    fenced.append(message)
                    continue
                change = detector.beat(message.worker, message.pid, time.monotonic())
                transitions += [change] if change else []
            transitions += detector.sweep(time.monotonic())
            if until and until(transitions):
                break
        return transitions, fenced

    pump(10, until=lambda ts: sum(t.state is WorkerState.HEALTHY for t in ts) == 2)
    yield senders, membership, pump
    for proc in senders:
        proc.kill()
        proc.wait()
    receiver.close()


def test_sigkill_is_detected_within_the_timeout(controller):
    senders, membership, pump = controller
    killed_at = time.monotonic()
    senders[1].send_signal(signal.SIGKILL)
    transitions, _ = pump(5, until=lambda ts: any(t.state is WorkerState.DEAD for t in ts))
    detected = time.monotonic() - killed_at
    assert [t.worker for t in transitions if t.state is WorkerState.DEAD] == [1]
    assert detected < TIMEOUT + 0.5
    assert membership.workers[0].state is WorkerState.HEALTHY


def test_sigstop_is_suspected_then_dead_and_fenced_after_sigcont(controller):
    senders, membership, pump = controller
    stopped_at = time.monotonic()
    os.kill(senders[0].pid, signal.SIGSTOP)
    transitions, _ = pump(5, until=lambda ts: any(t.state is WorkerState.DEAD for t in ts))
    states = [t.state for t in transitions if t.worker == 0]
    assert states == [WorkerState.SUSPECT, WorkerState.DEAD]
    assert time.monotonic() - stopped_at < TIMEOUT + 0.5
    membership.regroup((1,))  # the survivors move on to epoch 1
    os.kill(senders[0].pid, signal.SIGCONT)
    _, fenced = pump(0.5)
    assert fenced and {m.worker for m in fenced} == {0, 1}  # both still beat epoch 0 here: refused, not counted
    assert membership.workers[0].state is WorkerState.DEAD
