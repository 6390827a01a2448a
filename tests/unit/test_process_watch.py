"""The controller learns of a worker's exit from a pidfd (or psutil where there is none): real processes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ft.heartbeat import MessageReceiver
from ft.process_watch import HAS_PIDFD, ProcessWatch

MODES = [pytest.param(True, id="pidfd", marks=pytest.mark.skipif(not HAS_PIDFD, reason="no os.pidfd_open")),
         pytest.param(False, id="psutil")]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("use_pidfd", MODES)
def test_a_killed_process_is_gone_even_before_it_is_reaped(sleeper, use_pidfd):
    watch = ProcessWatch(use_pidfd)
    assert not watch.gone(sleeper.pid) and not watch.gone(None)
    os.kill(sleeper.pid, signal.SIGSTOP)  # a hung process is alive: silence, not exit, tells about it
    assert not watch.gone(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not watch.gone(sleeper.pid):  # a zombie now: this test's process has not reaped it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sleeper.poll() is not None
    assert watch.gone(sleeper.pid)  # and after it was reaped


def test_no_pid_at_all_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert ProcessWatch().gone(proc.pid)


@pytest.mark.skipif(not HAS_PIDFD, reason="no os.pidfd_open")
def test_an_exit_wakes_a_wait_on_the_heartbeat_socket_at_once(sleeper, tmp_path):
    """The controller's wait returns when a watched process dies, not at its timeout; a dead one is no longer
    waited on (it would wake every wait)."""
    receiver = MessageReceiver(f"ipc://{tmp_path}/beats")
    watch = ProcessWatch()
    try:
        assert watch.fds([sleeper.pid]) == []  # not asked about yet: no descriptor opened
        assert not watch.gone(sleeper.pid) and len(watch.fds([sleeper.pid])) == 1  # as the controller's sweep does
        started = time.monotonic()
        assert receiver.poll(0.2, watch.fds([sleeper.pid])) == []
        assert time.monotonic() - started >= 0.19  # nothing happened: the whole timeout
        os.kill(sleeper.pid, signal.SIGKILL)
        started = time.monotonic()
        assert receiver.poll(5.0, watch.fds([sleeper.pid])) == []
        assert time.monotonic() - started < 1.0
        assert watch.gone(sleeper.pid) and watch.fds([sleeper.pid]) == []
        watch.forget(sleeper.pid)
        assert watch.fds([]) == []
    finally:
        watch.close()
        receiver.close()
