"""benchmark/stream_stall.py: the gaps, summaries and breakdowns it computes, on chunk times and log lines made up
here with the expected values worked out by hand (the measurement itself launches a server:
`python -m benchmark.stream_stall`, results in benchmark/results/stream_stall.json)."""

from __future__ import annotations

import pytest

from benchmark import stream_stall


def test_only_streams_in_flight_at_the_fault_count_each_with_the_time_to_its_next_chunk():
    streams = [
        [0.10, 0.20, 0.30, 0.95],  # in flight: next chunk 0.55 s after the fault
        [0.05, 0.15],              # finished before the fault
        [0.60, 0.70],              # began after it
        [0.25, 0.50, 0.80],        # in flight: next chunk 0.10 s after
        [],                        # sent, nothing streamed
    ]
    assert stream_stall.next_chunk_gaps(streams, 0.40) == pytest.approx([0.55, 0.10])


def test_a_chunk_at_the_fault_itself_is_the_next_one():
    assert stream_stall.next_chunk_gaps([[0.2, 0.4, 0.9]], 0.4) == [0.0]
    assert stream_stall.next_chunk_gaps([[0.4, 0.9]], 0.4) == []  # nothing before it: not in flight


def test_a_stall_after_a_chunk_already_on_its_way_is_the_streams_stall():
    streams = [
        [0.10, 0.30, 0.41, 1.50, 1.60],  # a chunk 10 ms after the fault, then silent until 1.50: stall 1.09 s
        [0.20, 0.35, 1.45, 1.55],        # silent from the fault to 1.45: 1.05 s, its next chunk's gap too
        [0.25, 0.38, 0.39],              # finished before the fault
        [0.30, 0.45, 0.60, 2.40],        # the silence from 0.60 began after the regroup was done (0.55)
    ]
    assert stream_stall.stalls(streams, 0.40, 0.55) == pytest.approx([1.09, 1.05, 0.15])
    assert stream_stall.next_chunk_gaps(streams, 0.40) == pytest.approx([0.01, 1.05, 0.05])


def test_the_summary_takes_each_faults_slowest_stream_then_the_median_over_faults():
    def fault(kind, stalls, declared, next_chunk=None):
        return {"kind": kind, "stalls_ms": stalls, "declared_ms": declared, "next_chunk_ms": next_chunk or stalls}

    faults = [
        fault("kill", [100.0, 240.0], 80.0),
        fault("kill", [300.0, 50.0, 120.0], 120.0),
        fault("kill", [200.0], 100.0),
        fault("kill", [], 90.0),  # no stream in flight: not a measurement
        fault("stop", [900.0, 850.0], 520.0, next_chunk=[11.0, 850.0]),
        fault("stop", [700.0], None),
    ]
    summary = stream_stall.summarize(faults)
    kill, stop = summary["kill"], summary["stop"]
    assert kill["faults"] == 3
    assert kill["stall_ms"] == {"median": 240.0, "max": 300.0, "n": 3}  # stalls 240, 300, 200
    assert kill["stream_stall_ms"] == {"median": 160.0, "max": 300.0, "n": 6}  # 50 100 120 | 200 240 300
    assert kill["declared_ms"] == {"median": 100.0, "max": 120.0, "n": 3}
    assert kill["met"] is True  # 240 <= 250
    assert stop["stall_ms"] == {"median": 800.0, "max": 900.0, "n": 2}  # stalls 900, 700
    assert stop["next_chunk_ms"] == {"median": 775.0, "max": 850.0, "n": 2}  # slowest next chunks 850, 700
    assert stop["declared_ms"] == {"median": 520.0, "max": 520.0, "n": 1}
    assert stop["met"] is True  # 800 <= 800


def test_a_missed_target_and_a_phase_without_faults():
    summary = stream_stall.summarize([{"kind": "kill", "stalls_ms": [251.0], "next_chunk_ms": [251.0],
                                       "declared_ms": 90.0}])
    assert summary["kill"]["met"] is False
    none = {"median": None, "max": None, "n": 0}
    assert summary["stop"] == {"faults": 0, "stall_ms": none, "stream_stall_ms": none, "next_chunk_ms": none,
                               "declared_ms": none, "target_ms": 800.0, "met": False}


def test_the_breakdown_leaves_out_late_stages_and_gives_the_rest_to_the_first_step():
    stages = {"rebuild_process_groups": 40.0, "park_requests": 20.0, "restore_kv": 30.5, "recapture_graphs": 500.0}
    assert stream_stall.breakdown(260.0, 90.0, stages) == {"declared_ms": 90.0, "stages_ms": 90.5,
                                                           "after_stages_ms": 79.5}  # 260 - 90 - 90.5
    assert stream_stall.breakdown(260.0, None, stages)["after_stages_ms"] is None


def test_the_rebuild_parts_are_the_slowest_members_per_epoch():
    log = "\n".join([
        "[2026-12-02 15:00:01 TP1] sglang-ft: recovery to epoch 1: rebuild_process_groups done in 30.2 ms "
        "(rank 1 of 3, from standby groups: teardown 10.0 ms, store 0.5 ms, groups 19.1 ms)",
        "[2026-12-02 15:00:01 TP2] sglang-ft: recovery to epoch 1: rebuild_process_groups done in 41.0 ms "
        "(rank 2 of 3, from standby groups: teardown 12.0 ms, store 0.4 ms, groups 28.0 ms)",
        "[2026-12-02 15:00:01 TP2] sglang-ft: recovery to epoch 1: park_requests done in 9.0 ms (6 requests)",
        "[2026-12-02 15:00:09 TP0] sglang-ft: recovery to epoch 2: rebuild_process_groups done in 400.0 ms "
        "(rank 0 of 4: teardown 20.0 ms, store 300.0 ms, groups 79.0 ms)",
    ])
    assert stream_stall.rebuild_parts(log) == {
        1: {"ms": 41.0, "standby": True, "parts_ms": {"teardown": 12.0, "store": 0.4, "groups": 28.0}},
        2: {"ms": 400.0, "standby": False, "parts_ms": {"teardown": 20.0, "store": 300.0, "groups": 79.0}},
    }


def test_lost_and_wrong_outputs_and_empty_faults_fail_the_run():
    clean = {"load": {"mismatched": 0, "lost": 0}, "faults": [{"kind": "kill", "rank": 1, "stalls_ms": [120.0]}]}
    assert stream_stall.failures(clean) == []
    bad = {"load": {"mismatched": 2, "lost": 1}, "faults": [{"kind": "stop", "rank": 2, "stalls_ms": []}]}
    assert stream_stall.failures(bad) == ["2 outputs differ from transformers", "1 requests lost",
                                          "stop of rank 2: no stream in flight"]


@pytest.mark.parametrize("argv", [["--tp", "1"], ["--kills", "-1"], ["--clients", "0"],
                                  ["--clients", "6", "--max-new-tokens", "20", "--stagger", "4"]])
def test_bad_arguments_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stream_stall.parse_args(argv)
    assert exit_info.value.code == 2
    assert "--" in capsys.readouterr().err.splitlines()[-1]
