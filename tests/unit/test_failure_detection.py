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


# --- a hang confirmed by a blocked peer (the defaults: 200 ms beats, 1 s timeout) --------------------------------


def simulate(workers: int, beats: dict, until: float, confirm_hangs: bool = True, serving: bool = True):
    """Drive a detector at the default settings with a 10 ms sweep, as the controller's loop does: `beats[w]` maps
    worker w's beat times to how long its current iteration has run then. Returns {worker: [(time, state, cause)]}
    of every change after the first beats."""
    membership = Membership.initial(workers)
    detector = FailureDetector(membership, interval_s=0.2, timeout_s=1.0)
    events = sorted((t, w, running) for w, times in beats.items() for t, running in times.items())
    seen: dict = {w: [] for w in range(workers)}
    for tick in range(round(until * 1000) // 10 + 1):
        now = tick / 100
        while events and events[0][0] <= now + 1e-9:
            t, worker, running = events.pop(0)
            first = membership.workers[worker].last_beat is None
            change = detector.beat(worker, 100 + worker, t, serving=serving, step_running_s=running)
            if change and not first:  # a suspect healthy again (not a worker's first beat)
                seen[worker].append((round(t, 3), change.state, change.cause))
        for change in detector.sweep(now, confirm_hangs=confirm_hangs):
            seen[change.worker].append((round(now, 3), change.state, change.cause))
    return seen


def timeline(changes: list) -> list:
    return [(at, state) for at, state, _ in changes]


def approx(seconds: float):
    """A sweep's time, give or take its 10 ms tick."""
    return pytest.approx(seconds, abs=0.0101)


def every(start: float, stop: float, running=lambda t: 0.0, interval: float = 0.2) -> dict:
    """Beats every `interval` from `start` while before `stop`; `running(t)`: the iteration's time at beat t."""
    times = [round(start + i * interval, 6) for i in range(int((stop - start) / interval + 1e-9) + 1)]
    return {t: running(t) for t in times if t < stop}


def blocked_since(started: float):
    return lambda t: max(0.0, t - started)


def test_a_silent_worker_is_dead_at_once_when_a_peer_is_blocked_on_it():
    """Worker 1 is stopped at 1.05 s, 50 ms after its last beat; worker 0's iteration started at 1.0 s and never ends
    (it waits in a collective for worker 1). Declared dead by 1.6 s (600 ms after the stop), not at the timeout."""
    seen = simulate(2, {0: {**every(0.0, 1.0), **every(1.0, 3.0, blocked_since(1.0))}, 1: every(0.0, 1.05)}, 3.0)
    (at, state, cause), = [e for e in seen[1] if e[1] is WorkerState.DEAD]
    assert 1.0 + 0.4 <= at <= 1.05 + 0.6  # from the suspect threshold after its last beat
    assert cause.startswith("hang confirmed by a blocked peer (worker 0 blocked ")
    assert seen[0] == []


def test_a_silent_worker_without_a_blocked_peer_waits_out_the_timeout():
    """Worker 0 is idle (its iterations are not stamped) or keeps finishing short ones: nothing confirms a hang."""
    for running in (lambda t: 0.0, lambda t: 0.03):
        seen = simulate(2, {0: every(0.0, 3.0, running), 1: every(0.0, 1.0)}, 3.0)
        assert timeline(seen[1]) == [(approx(1.2), WorkerState.SUSPECT), (approx(1.8), WorkerState.DEAD)]
        assert seen[1][-1][2] == "heartbeat timeout"


@pytest.mark.parametrize("stop", [0.801, 0.85, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("iteration", [0.0, 0.1, 0.175])
def test_a_250_ms_stall_is_never_a_failure(stop, iteration):
    """The chaos soak's stall: SIGSTOP for a quarter of the timeout, anywhere between two beats (at worst right
    before the next beat is due, 0.8 s + 200 ms: a 450 ms gap), then a beat as soon as it resumes (20 ms late). Its
    peer has been in its iteration `iteration` s before the stop (up to the longest normal iteration measured under
    load, 174 ms) and waits for it until 30 ms after the resume."""
    resumed = stop + 0.25
    peer_started = stop - iteration
    peer = {**every(0.0, peer_started), **every(0.0, 3.0, lambda t: max(0.0, t - peer_started)
                                                if t < resumed + 0.03 else 0.0)}
    seen = simulate(2, {0: peer, 1: {**every(0.0, stop), **every(resumed + 0.02, 3.0)}}, 3.0)
    assert all(state is not WorkerState.DEAD for _, state, _ in seen[1]), seen[1]


def test_a_worker_that_has_not_finished_a_batch_keeps_its_startup_bound():
    """Loading weights and the first forward hold the GIL: a starting worker silent past the suspect threshold is
    only suspect, however long its peers wait, and a starting peer confirms no one's hang."""
    beats = {0: every(0.0, 12.0, blocked_since(0.0)), 1: every(0.0, 0.5)}
    seen = simulate(2, beats, 12.0, serving=False)
    assert timeline(seen[1]) == [(approx(0.8), WorkerState.SUSPECT), (approx(10.4), WorkerState.DEAD)]


def test_a_group_of_one_has_no_peer_and_uses_the_timeout():
    seen = simulate(1, {0: every(0.0, 1.0, blocked_since(0.5))}, 3.0)
    assert timeline(seen[0]) == [(approx(1.2), WorkerState.SUSPECT), (approx(1.8), WorkerState.DEAD)]


def test_every_member_in_a_long_step_with_fresh_beats_is_no_failure():
    """A long prompt's prefill: every member's iteration runs 2 s, and every beat comes on time."""
    seen = simulate(3, {w: every(0.0, 4.0, lambda t: t % 2.0) for w in range(3)}, 4.0)
    assert seen == {0: [], 1: [], 2: []}


def test_a_peer_whose_own_beats_are_late_confirms_nothing():
    """Both stopped (e.g. a whole node): neither one's old report of a long iteration confirms the other's hang;
    and while a regroup is under way no hang is confirmed either (its members leave their iterations)."""
    seen = simulate(2, {0: every(0.0, 1.0, blocked_since(0.5)), 1: every(0.0, 1.0)}, 3.0)
    assert [state for _, state, _ in seen[1]] == [WorkerState.SUSPECT, WorkerState.DEAD]
    assert seen[1][-1][2] == "heartbeat timeout"
    beats = {0: every(0.0, 3.0, blocked_since(1.0)), 1: every(0.0, 1.0)}
    assert [at for at, _ in timeline(simulate(2, beats, 3.0, confirm_hangs=False)[1])] == [approx(1.2), approx(1.8)]


def test_the_longest_iteration_a_worker_reported_is_kept():
    membership = Membership.initial(2)
    detector = FailureDetector(membership, interval_s=0.2, timeout_s=1.0)
    for now, running in ((0.0, 0.0), (0.2, 0.12), (0.4, 0.05), (0.6, 0.0)):
        detector.beat(0, 100, now, step_running_s=running)
    assert membership.workers[0].max_step_s == pytest.approx(0.12)
    assert detector.blocked_s(0, 0.7) is None  # between iterations
    detector.beat(0, 100, 0.8, step_running_s=0.3)
    assert detector.blocked_s(0, 0.9) == pytest.approx(0.4)
    assert detector.blocked_s(0, 5.0) == pytest.approx(0.5)  # no further than one interval past its last beat


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
def test_heartbeats_round_trip(worker, pid, epoch, seq):  # (out of these bounds: tests/unit/test_message_fuzz.py)
    message = Heartbeat(worker, pid, epoch, seq)
    assert decode(encode(message)) == message


SENDER = """
import sys, time
from ft.heartbeat import HeartbeatSender
sender = HeartbeatSender(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
if sys.argv[4] == "blocked":  # its scheduler entered an iteration that never ends (waiting on a hung peer)
    sender.step_started = time.monotonic()
sender.start()
time.sleep(600)
"""
INTERVAL, TIMEOUT = 0.05, 0.6


@pytest.fixture
def controller(tmp_path, request):
    """Two heartbeat sender processes and a detector pumped like the controller's loop; with the parameter
    `blocked`, those workers report an iteration running since they started."""
    blocked = getattr(request, "param", {}).get("blocked", ())
    endpoint = f"ipc://{tmp_path}/hb.sock"
    receiver = MessageReceiver(endpoint)
    membership = Membership.initial(2)
    detector = FailureDetector(membership, INTERVAL, TIMEOUT)
    senders = [subprocess.Popen([sys.executable, "-c", SENDER, endpoint, str(w), str(INTERVAL),
                                 "blocked" if w in blocked else "-"], cwd=os.getcwd()) for w in range(2)]

    def pump(seconds, until=None):
        """Run the controller loop for up to `seconds`; returns (transitions, fenced heartbeats)."""
        transitions, fenced = [], []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in receiver.poll(INTERVAL / 2):
                if not membership.is_current(message.epoch):
                    fenced.append(message)
                    continue
                change = detector.beat(message.worker, message.pid, time.monotonic(),
                                       step_running_s=message.step_running_s)
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


@pytest.mark.parametrize("controller", [{"blocked": (1,)}], indirect=True)
def test_sigstop_with_a_blocked_peer_is_dead_at_the_suspect_threshold(controller):
    """Worker 1 reports an iteration running since it started: worker 0's SIGSTOP is confirmed by it, and worker 0
    is declared dead once silent for the suspect threshold (2 intervals), not at the timeout."""
    senders, membership, pump = controller
    os.kill(senders[0].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        transitions, _ = pump(5, until=lambda ts: any(t.state is WorkerState.DEAD for t in ts))
        detected = time.monotonic() - stopped_at
    finally:
        os.kill(senders[0].pid, signal.SIGCONT)
    (dead,) = [t for t in transitions if t.state is WorkerState.DEAD]
    assert dead.worker == 0 and dead.cause.startswith("hang confirmed by a blocked peer (worker 1 blocked ")
    assert detected < TIMEOUT, f"declared {detected * 1e3:.0f} ms after the stop"
    assert membership.workers[1].state is not WorkerState.DEAD
