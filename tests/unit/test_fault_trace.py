"""Fault traces (ft.fault_trace): the JSON Lines format, its validator, and the seeded Poisson generator."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ft import fault_trace
from ft.fault_trace import (FaultEvent, FaultTrace, TraceError, TraceHeader, generate, load_trace, main,
                            parse_trace, save_trace, validate)

HEADER = {"format": "sglang-ft-fault-trace", "version": 1, "source": "hand", "window_s": 60.0, "tp_size": 4,
          "seed": None, "min_live": 1}


def text_of(*events, header=None):
    return "\n".join(json.dumps(x) for x in [header or HEADER, *events]) + "\n"


def trace_of(*events, tp_size=4, min_live=1, window_s=60.0):
    header = TraceHeader("hand", window_s, tp_size, None, min_live)
    return FaultTrace(header, tuple(FaultEvent(t, w, e) for t, w, e in events))


def test_rate_arithmetic_is_the_published_llama3_figures():
    # 0.587 * 419 GPU-related interruptions over 16,384 GPUs for 54 days
    assert fault_trace.GPU_FAILURES_PER_GPU_S == pytest.approx(245.953 / (16_384 * 54 * 86_400), rel=1e-5)
    assert fault_trace.GPU_FAILURES_PER_GPU_S == pytest.approx(3.218e-9, rel=1e-3)
    per_gpu_day = fault_trace.GPU_FAILURES_PER_GPU_S * 86_400
    assert 1 / per_gpu_day == pytest.approx(3_597, rel=1e-3)  # GPU-days between failures
    assert fault_trace.expected_failures(4, 120) == pytest.approx(3.09, abs=0.01)


def test_round_trip(tmp_path):
    trace = generate(6, 300, seed=5, min_live=2)
    assert trace.events, "the default acceleration gives failures in 300 s on 6 workers"
    path = tmp_path / "t.jsonl"
    save_trace(path, trace)
    assert load_trace(path) == trace
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "sglang-ft-fault-trace"
    assert set(json.loads(lines[1])) == {"t_s", "worker", "event"}


def test_a_hand_written_trace_with_every_event_kind_is_valid():
    trace = parse_trace(text_of({"t_s": 1, "worker": 2, "event": "hang"}, {"t_s": 5.5, "worker": 2, "event": "resume"},
                                {"t_s": 6, "worker": 0, "event": "kill"}, {"t_s": 9, "worker": 2, "event": "rejoin"},
                                {"t_s": 9, "worker": 0, "event": "rejoin"}))
    assert [e.event for e in trace.events] == ["hang", "resume", "kill", "rejoin", "rejoin"]
    assert trace.header.min_live == 1 and trace.events[0].t_s == 1.0


@pytest.mark.parametrize("text, line, field, words", [
    ("", 1, None, "empty"),
    (text_of({"t_s": 1, "worker": 0, "event": "kill"}).replace("\n", "\n\n", 1) + '{"t_s": 2}', 2, None, "blank"),
    ("{not json\n", 1, None, "not JSON"),
    (text_of(header={**HEADER, "format": "other"}), 1, "format", "sglang-ft-fault-trace"),
    (text_of(header={**HEADER, "version": 2}), 1, "version", "version this reader knows"),
    (text_of(header={k: v for k, v in HEADER.items() if k != "tp_size"}), 1, "tp_size", "missing"),
    (text_of(header={**HEADER, "window_s": -1}), 1, "window_s", "positive"),
    ('{"t_s": 1, "worker": 0, "event": "kill"}\n', 1, "format", "header"),
    (text_of({"t_s": 1, "worker": 0, "event": "crash"}), 2, "event", "one of kill, hang, resume, rejoin"),
    (text_of({"t_s": 1, "rank": 0, "event": "kill"}), 2, "worker", "missing"),
    (text_of({"t_s": 1, "worker": 0, "event": "kill", "rank": 0}), 2, "rank", "launch id"),
    (text_of({"t_s": "1", "worker": 0, "event": "kill"}), 2, "t_s", "number"),
    (text_of({"t_s": 1, "worker": True, "event": "kill"}), 2, "worker", "integer"),
    (text_of({"t_s": 1, "worker": 7, "event": "kill"}), 2, "worker", "0..3"),
    (text_of({"t_s": 61, "worker": 0, "event": "kill"}), 2, "t_s", "past the window"),
    (text_of({"t_s": 5, "worker": 0, "event": "kill"}, {"t_s": 4, "worker": 1, "event": "kill"}), 3, "t_s",
     "earlier"),
    (text_of({"t_s": 1, "worker": 0, "event": "kill"}, {"t_s": 2, "worker": 0, "event": "kill"}), 3, "event",
     "it is dead"),
    (text_of({"t_s": 1, "worker": 0, "event": "resume"}), 2, "event", "needs hung"),
    (text_of({"t_s": 1, "worker": 0, "event": "rejoin"}), 2, "event", "needs dead"),
    (text_of({"t_s": 1, "worker": 0, "event": "hang"}, {"t_s": 2, "worker": 0, "event": "hang"}), 3, "event",
     "it is hung"),
    (text_of(*({"t_s": i, "worker": i, "event": "kill"} for i in range(4))), 5, "event", "fewer than min_live 1"),
    (text_of(header={**HEADER, "min_live": 5}), 1, "min_live", "exceeds tp_size"),
])
def test_malformed_traces_name_the_line_and_field(text, line, field, words):
    with pytest.raises(TraceError) as err:
        parse_trace(text)
    assert (err.value.line, err.value.field) == (line, field)
    assert words in str(err.value)
    assert str(err.value).startswith(f"line {line}")


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(text_of({"t_s": 1, "worker": 0, "event": "resume"}))
    with pytest.raises(TraceError, match=r"bad\.jsonl: line 2, field 'event'"):
        load_trace(path)


def test_a_hung_worker_does_not_count_as_alive():
    validate(trace_of((1, 0, "hang"), (2, 1, "kill"), tp_size=3, min_live=1))
    with pytest.raises(TraceError, match="leaves 0 workers alive"):
        validate(trace_of((1, 0, "hang"), (2, 1, "kill"), tp_size=2, min_live=1))
    validate(trace_of((1, 0, "hang"), (2, 0, "kill"), (3, 0, "rejoin"), tp_size=2))  # kill a hung worker


def test_same_seed_same_trace_other_seed_other_trace():
    a, b = generate(8, 600, seed=11), generate(8, 600, seed=11)
    assert a == b and a.events
    assert generate(8, 600, seed=12).events != a.events


def test_bad_generator_arguments():
    for kwargs in ({"min_live": 5}, {"acceleration": 0}, {"hang_fraction": 1.5}, {"repair_s": -1}):
        with pytest.raises(ValueError):
            generate(4, 60, seed=0, **kwargs)


def test_count_over_a_long_window_is_poisson_without_downtime():
    """With instant repair every worker is always alive: kills are Poisson(tp * rate * window)."""
    rate = 0.5
    acceleration = rate / fault_trace.GPU_FAILURES_PER_GPU_S
    tp, window = 4, 5_000.0
    trace = generate(tp, window, seed=1, acceleration=acceleration, min_live=0, repair_s=0.0, hang_fraction=0.0)
    kills = sum(e.event == "kill" for e in trace.events)
    mean = tp * rate * window
    assert fault_trace.expected_failures(tp, window, acceleration) == pytest.approx(mean)
    assert abs(kills - mean) < 5 * math.sqrt(mean)
    assert sum(e.event == "rejoin" for e in trace.events) == kills


def test_count_with_repair_downtime_is_a_renewal_process():
    """Each worker alternates up ~ Exp(rate) and down repair_s (+ hang_s for a hang): failures per second of a
    worker tend to 1 / mean cycle, with variance window * var(cycle) / mean(cycle)^3."""
    rate, repair_s, hang_s, hang_fraction = 1.0, 0.5, 0.3, 0.4
    acceleration = rate / fault_trace.GPU_FAILURES_PER_GPU_S
    tp, window = 4, 3_000.0
    trace = generate(tp, window, seed=2, acceleration=acceleration, min_live=0, repair_s=repair_s,
                     hang_fraction=hang_fraction, hang_s=hang_s)
    failures = sum(e.event in ("kill", "hang") for e in trace.events)
    cycle = 1 / rate + repair_s + hang_fraction * hang_s
    var_cycle = 1 / rate**2 + hang_fraction * (1 - hang_fraction) * hang_s**2
    mean, sd = tp * window / cycle, math.sqrt(tp * window * var_cycle / cycle**3)
    assert abs(failures - mean) < 5 * sd + 5
    hangs = sum(e.event == "hang" for e in trace.events)
    assert abs(hangs / failures - hang_fraction) < 0.05


@st.composite
def generator_args(draw):
    tp = draw(st.integers(1, 8))
    return dict(tp_size=tp, window_s=draw(st.floats(1, 600)), seed=draw(st.integers(0, 2**32)),
                acceleration=draw(st.floats(1e5, 5e7)), min_live=draw(st.integers(0, tp)),
                repair_s=draw(st.one_of(st.none(), st.floats(0, 60))), hang_fraction=draw(st.floats(0, 1)),
                hang_s=draw(st.floats(0, 30)))


@settings(max_examples=200, deadline=None)
@given(generator_args())
def test_generated_traces_are_consistent(args):
    trace = generate(**args)
    validate(trace)
    h = trace.header
    assert (h.tp_size, h.window_s, h.min_live) == (args["tp_size"], args["window_s"], args["min_live"])
    # the invariants, checked here without the module's transition table
    dead, hung, last = set(), set(), 0.0
    for e in trace.events:
        assert last <= e.t_s <= h.window_s and 0 <= e.worker < h.tp_size
        last = e.t_s
        if e.event == "kill":
            assert e.worker not in dead
            hung.discard(e.worker)
            dead.add(e.worker)
        elif e.event == "hang":
            assert e.worker not in dead and e.worker not in hung
            hung.add(e.worker)
        elif e.event == "resume":
            assert e.worker in hung
            hung.remove(e.worker)
            dead.add(e.worker)
        else:
            assert e.event == "rejoin" and e.worker in dead
            dead.remove(e.worker)
        assert h.tp_size - len(dead) - len(hung) >= h.min_live
    if args["repair_s"] is None:
        assert not any(e.event == "rejoin" for e in trace.events)
    assert parse_trace(fault_trace.dumps_trace(trace)) == trace


@settings(max_examples=100, deadline=None)
@given(generator_args(), st.data())
def test_every_prefix_is_valid_and_repeating_a_failure_is_not(args, data):
    trace = generate(**args)
    cut = data.draw(st.integers(0, len(trace.events)))
    validate(FaultTrace(trace.header, trace.events[:cut]))
    if trace.events:
        i = data.draw(st.integers(0, len(trace.events) - 1))
        events = list(trace.events)
        events.insert(i + 1, events[i])  # the same transition twice in a row is never allowed
        with pytest.raises(TraceError, match=f"line {i + 3}, field 'event'"):
            validate(FaultTrace(trace.header, tuple(events)))


def test_cli_generate_and_show(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["generate", str(out), "--tp-size", "4", "--window-s", "120", "--seed", "0"]) == 0
    assert "expected" in capsys.readouterr().out
    assert load_trace(out) == generate(4, 120, seed=0)
    assert main(["show", str(out)]) == 0
    table = capsys.readouterr().out
    assert "t_s" in table and "alive after" in table and "events:" in table
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text_of({"t_s": 1, "worker": 9, "event": "kill"}))
    assert main(["show", str(bad)]) == 2
    assert "line 2, field 'worker'" in capsys.readouterr().err
    assert main(["generate", str(out), "--tp-size", "4", "--window-s", "60", "--seed", "0", "--no-rejoin",
                 "--acceleration", "2e7"]) == 0
    assert not any(e.event == "rejoin" for e in load_trace(out).events)
