"""When dead workers are restarted and when a restart is given up on (`ft.respawn`, pure: time passed in)."""

from ft.respawn import Respawner, RespawnPolicy


def test_automatic_restart_waits_for_the_delay_and_only_when_startable():
    respawner = Respawner(RespawnPolicy(automatic=True, delay_s=5.0))
    respawner.on_dead(2, now=100.0)
    assert respawner.take_due(104.9, lambda w: True) == []
    assert respawner.take_due(105.0, lambda w: False) == []  # e.g. still in the group being replaced
    assert respawner.take_due(105.0, lambda w: True) == [2]
    assert respawner.take_due(200.0, lambda w: True) == []  # started once
    assert respawner.attempts == {2: 1} and 2 in respawner.starting


def test_without_automatic_restart_only_an_operator_brings_a_worker_back():
    respawner = Respawner(RespawnPolicy(automatic=False))
    respawner.on_dead(1, now=0.0)
    assert respawner.take_due(1e6, lambda w: True) == []
    assert respawner.request(1, now=10.0)
    assert respawner.take_due(10.0, lambda w: True) == [1]


def test_a_worker_being_started_cannot_be_requested_again():
    respawner = Respawner(RespawnPolicy())
    assert respawner.request(3, now=0.0)
    assert respawner.take_due(0.0, lambda w: True) == [3]
    assert not respawner.request(3, now=1.0)


def test_a_restart_that_keeps_failing_is_given_up_after_max_attempts():
    respawner = Respawner(RespawnPolicy(automatic=True, delay_s=1.0, max_attempts=3, ready_timeout_s=50.0))
    now, started = 0.0, []
    respawner.on_dead(0, now)
    for _ in range(5):
        now += 10.0
        started += respawner.take_due(now, lambda w: True)
        respawner.on_dead(0, now)  # the restarted process died before it was ready
    assert started == [0, 0, 0]
    assert respawner.take_due(now + 100, lambda w: True) == []


def test_a_restart_that_never_becomes_ready_is_overdue_and_joining_resets_the_count():
    respawner = Respawner(RespawnPolicy(automatic=True, delay_s=0.0, ready_timeout_s=30.0))
    respawner.on_dead(1, 0.0)
    respawner.take_due(0.0, lambda w: True)
    assert respawner.overdue(29.0) == [] and respawner.overdue(31.0) == [1]
    respawner.on_ready(1)
    assert respawner.overdue(100.0) == []
    respawner.on_joined(1)
    assert respawner.attempts == {}
