"""benchmark/hang_detection.py: its summary and pass criteria on synthetic data, and its arguments (the measurement
itself launches a server: `python benchmark/hang_detection.py`, results in benchmark/results/hang_detection.json)."""

from __future__ import annotations

import pytest

from benchmark import hang_detection

CONFIRMED = "worker 1: hang confirmed by a blocked peer (worker 0 blocked 412 ms)"


def report(**changes) -> dict:
    base = {"stalls": [{"worker": 1, "pid": 10, "kept": True, "epoch_unchanged": True}],
            "hangs": [{"worker": 1, "detect_ms": 450.0, "polled_ms": 480.0, "cause": CONFIRMED}],
            "load": {"mismatched": 0, "lost": 0}}
    return {**base, **changes}


def test_the_summary_is_the_median_and_max_of_each_time_and_the_confirmed_count():
    hangs = [{"detect_ms": ms, "polled_ms": ms + 40, "cause": CONFIRMED} for ms in (420.0, 510.0, 460.0)]
    hangs.append({"detect_ms": 1010.0, "polled_ms": 1090.0, "cause": "worker 0: heartbeat timeout"})
    summary = hang_detection.summarize(hangs)
    assert summary["confirmed_by_a_blocked_peer"] == 3 and summary["hangs"] == 4
    assert summary["detect_ms"] == {"median": 485.0, "max": 1010.0, "min": 420.0}
    assert summary["polled_ms"] == {"median": 525.0, "max": 1090.0, "min": 460.0}


def test_a_clean_run_passes():
    assert hang_detection.failures(report(), 1000) == []


@pytest.mark.parametrize("changes, message", [
    ({"stalls": [{"worker": 1, "pid": 10, "kept": False, "epoch_unchanged": False}]},
     "stall of worker 1 (pid 10) changed the group"),
    ({"hangs": [{"worker": 0, "detect_ms": 1012.0, "polled_ms": 1100.0, "cause": "worker 0: heartbeat timeout"}]},
     "hang of worker 0 declared after 1012.0 ms (timeout 1000 ms)"),
    ({"load": {"mismatched": 2, "lost": 0}}, "2 outputs differ from transformers"),
    ({"load": {"mismatched": 0, "lost": 1}}, "1 requests lost"),
])
def test_each_broken_criterion_is_named(changes, message):
    assert hang_detection.failures(report(**changes), 1000) == [message]


@pytest.mark.parametrize("argv, flag", [(["--tp", "1"], "--tp"), (["--clients", "0"], "--clients"),
                                        (["--hangs", "-1"], "--hangs")])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        hang_detection.parse_args(argv)
    assert flag in capsys.readouterr().err
