"""benchmark/chaos.py without a server: its pass criteria and fault rules on synthetic data, its arguments (its live
server runs in tests/server/test_chaos.py)."""

from __future__ import annotations

import random

import pytest

from benchmark import chaos
from sglang_ft.tools.load import longest_gap


def passing_report(**changes) -> dict:
    report = {"served": 40, "mismatched": 0, "resent": 0, "lost": 0, "hung": 0,
              "actions": [{"kind": k, "worker": 1, "pid": 10, "outcome": "ok", "ok": True} for k in chaos.KINDS],
              "not_back": [], "recoveries": [], "kv_tokens_used": {"before": 0, "after": 0}, "requests_left": 0,
              "replaced_still_running": [], "healthy_at_end": True, "stragglers": []}
    return {**report, **changes}


def test_a_clean_soak_passes():
    assert chaos.failures(passing_report()) == []


@pytest.mark.parametrize("changes, message", [
    ({"mismatched": 2}, "2 outputs differ from transformers"),
    ({"resent": 1}, "1 attempts had to be re-sent"),
    ({"lost": 3}, "3 requests lost"),
    ({"hung": 1}, "1 requests hung"),
    ({"not_back": [2]}, "workers [2] never rejoined"),
    ({"recoveries": [{"epoch": 3, "cause": "rejoin of worker 1", "joined": [1], "bytes_reloaded": 4096,
                      "kv_tokens_recomputed": 0}]}, "the rejoin of epoch 3 read 4096 bytes from disk"),
    ({"recoveries": [{"epoch": 3, "cause": "worker 2: heartbeat timeout", "joined": [1], "bytes_reloaded": 0,
                      "kv_tokens_recomputed": 7}]}, "recomputed 7 KV tokens"),
    ({"kv_tokens_used": {"before": 0, "after": 48}}, "KV slots leaked"),
    ({"requests_left": 1}, "KV slots leaked"),
    ({"replaced_still_running": [77]}, "replaced processes still running: [77]"),
    ({"healthy_at_end": False}, "/health failed"),
    ({"stragglers": [5]}, "outlived the launcher"),
    ({"served": 0}, "no request was served"),
])
def test_each_broken_criterion_fails_the_soak(changes, message):
    found = chaos.failures(passing_report(**changes))
    assert len(found) == 1 and message in found[0], found


def test_a_failure_that_also_admits_a_joiner_may_read_the_dead_workers_slices():
    """A worker that dies while another is ready to rejoin: one regroup does both, and the dead one's slices are on
    disk only (a rejoin alone must take everything from its peers)."""
    both = {"epoch": 6, "cause": "worker 2: heartbeat timeout", "joined": [1], "bytes_reloaded": 303104,
            "kv_tokens_recomputed": 0}
    assert chaos.failures(passing_report(recoveries=[both])) == []


def test_a_server_that_stopped_answering_fails_the_soak():
    report = {"unreachable": "the server stopped answering: ReadTimeout()", "actions": []}
    assert chaos.failures(report) == [report["unreachable"]]
    assert "FAIL: the server stopped answering" in chaos.table({**report, "failures": chaos.failures(report)})


def test_a_fault_not_survived_is_named():
    actions = passing_report()["actions"]
    actions[1] = {**actions[1], "ok": False, "outcome": "never declared dead"}
    (found,) = chaos.failures(passing_report(actions=actions))
    assert found == f"{actions[1]['kind']} of worker 1 (pid 10) not survived: never declared dead"


def status(ranks: list, states: list, regrouping=None, store_pid=5) -> dict:
    return {"regrouping": regrouping, "kv_backup": {"pid": store_pid},
            "workers": [{"worker": i, "rank": r, "state": s, "pid": 100 + i} for i, (r, s) in
                        enumerate(zip(ranks, states))]}


def test_faults_apply_only_where_they_leave_enough_workers_serving():
    monkey = chaos.Monkey("http://unused", random.Random(0), 2.0, min_live=2)
    three = status([0, 1, None, 2], ["healthy", "suspect", "dead", "healthy"])
    assert monkey.applicable("kill", three) and monkey.applicable("hang", three)
    assert monkey.applicable("rejoin", three) and monkey.applicable("store", three)
    two = status([0, None, None, 1], ["healthy", "dead", "dead", "healthy"])
    assert not monkey.applicable("kill", two) and not monkey.applicable("hang", two)
    assert monkey.applicable("stall", two) and monkey.applicable("torn", two)
    assert not monkey.applicable("torn", status([0, None], ["healthy", "dead"]))  # a torn step needs two ranks
    monkey.rejoining = {1: 0.0, 2: 0.0}  # both asked back already: nothing left to rejoin
    assert not monkey.applicable("rejoin", two)
    assert not monkey.applicable("store", status([0, 1], ["healthy"] * 2, store_pid=None))
    regrouping = status([0, 1, 2, 3], ["healthy"] * 4, regrouping=3)
    assert [k for k in chaos.KINDS if monkey.applicable(k, regrouping)] == ["stall"]


def test_longest_gap_is_the_longest_silence_in_the_window():
    tokens = [1.0, 1.1, 1.2, 4.2, 4.3]
    assert longest_gap(tokens, 0.5) == pytest.approx(3.0)
    assert longest_gap(tokens, 0.5, until=9.3) == pytest.approx(5.0)  # silence after the last token counts
    assert longest_gap([], 2.0, until=3.5) == pytest.approx(1.5)


@pytest.mark.parametrize("argv, flag", [(["--tp", "1"], "--tp"), (["--min-live", "4"], "--min-live"),
                                        (["--rounds", "0"], "--rounds"),
                                        (["--attention", "hybrid", "--kv-placement", "cyclic"], "--kv-placement")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        chaos.parse_args(argv)
    assert flag in capsys.readouterr().err
