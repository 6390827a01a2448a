"""benchmark/under_faults.py without SGLang servers: its measures on synthetic records (percentiles, goodput under
the SLO, recovery latency per fault, phases, ratios, the table and plot), the open-loop arrival schedule (seeded,
at the stated rate), the traces it draws (valid, the quick one with a kill and its rejoin), and `OpenLoad` against
an in-process fake of SGLang's streaming `/generate` that cuts some attempts, and `Load`'s staggered lengths."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
from tests.fake_http import serving
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ft.fault_trace import dumps_trace, parse_trace
from sglang_ft.tools.load import Load, OpenLoad, RequestRecord, arrival_times

from benchmark import under_faults
from benchmark import under_faults_measures as m

SLO = (2.0, 0.5)


def _record(i: int, arrival: float, ttft: float | None, tpot: float = 0.1, tokens: int = 16,
            failed: int = 0) -> RequestRecord:
    """A completed request (ttft given) with evenly spaced tokens, or a lost one (ttft None)."""
    r = RequestRecord(i, arrival, sent=True, failed_attempts=failed)
    if ttft is not None:
        r.first_token = arrival + ttft
        r.token_times = [r.first_token + k * tpot for k in range(tokens)]
        r.done, r.tokens, r.attempt_sent = r.token_times[-1], tokens, arrival
    return r


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 99, 100):
            assert m.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert m.percentile([], 50) is None


def test_recovery_latency_is_first_success_of_a_request_sent_after_the_fault():
    successes = [(9.0, 10.5),  # sent before the fault at 10: does not count for it, even though it ends after
                 (10.0, 10.7), (10.2, 10.4), (12.0, 12.1), (21.0, 25.0), (22.0, 24.0)]
    assert m.recovery_latencies([10.0, 20.0, 30.0], successes) == pytest.approx([0.4, 4.0, None])
    assert m.mean_recovery([10.0, 20.0], [0.4, None], end=40.0) == {"s": 10.2, "lower_bound": True}
    assert m.mean_recovery([], [], end=1.0) is None
    assert m.mean_recovery([10.0], [None], end=12.0) == {"s": None, "lower_bound": True}  # never recovered


def test_goodput_counts_only_requests_within_the_slo():
    records = [_record(0, 0.0, 0.5), _record(1, 1.0, 2.5),  # TTFT over 2 s
               _record(2, 2.0, 0.5, tpot=0.6),  # TPOT over 0.5 s
               _record(3, 3.0, 1.0, tokens=1),  # one token: no TPOT, within the SLO
               _record(4, 4.0, None)]  # lost
    g = m.goodput(records, window_s=10.0, ttft_s=2.0, tpot_s=0.5)
    assert g == {"requests_per_s": 0.2, "tokens_per_s": 1.7, "requests_meeting_slo": 2}


def test_latency_stats_and_phases():
    records = [_record(i, float(i), 0.1 * (i + 1)) for i in range(10)]
    stats = m.latency_stats(records + [_record(99, 0.0, None)])
    assert stats["completed"] == 10
    assert stats["ttft_p50_s"] == pytest.approx(0.55) and stats["ttft_p99_s"] == pytest.approx(0.991)
    assert stats["tpot_p50_s"] == pytest.approx(0.1)
    windows = [(5.0, 6.0)]
    r = _record(0, 0.0, 0.1)  # done at 1.6, before the fault at 5
    assert m.phase_of(r, 5.0, windows, end=30.0) == "before"
    assert m.phase_of(_record(1, 4.0, 0.1), 5.0, windows, end=30.0) == "recovery"  # in flight at the fault
    assert m.phase_of(_record(2, 5.5, 0.1), 5.0, windows, end=30.0) == "recovery"
    assert m.phase_of(_record(3, 7.0, 0.1), 5.0, windows, end=30.0) == "after"
    assert m.phase_of(_record(4, 7.0, None), 5.0, [(5.0, float("inf"))], end=30.0) == "recovery"


def _run(t0: float, fault_at: float, down_until: float) -> dict:
    """One request a second for 20 s, 4 tokens each 0.1 s apart; requests due while down complete at its end."""
    records = []
    for i in range(20):
        a = t0 + i
        r = _record(i, a, 0.2, tokens=4) if not fault_at <= a < down_until else _record(i, a, down_until - a + 0.2,
                                                                                           tokens=4, failed=2)
        records.append(r)
    replay = [{"t_s": fault_at - t0, "worker": 1, "event": "kill", "outcome": "sent", "at": fault_at, "pid": 1},
              {"t_s": 15.0, "worker": 1, "event": "rejoin", "outcome": "sent", "at": t0 + 15, "pid": None}]
    return {"t0": t0, "ended": t0 + 25, "records": records, "replay": replay, "probes": [(fault_at, down_until)]}


def test_summarize_and_ratios_on_synthetic_runs():
    ft = m.summarize(_run(100.0, 105.0, 105.5), 20.0, SLO)
    rr = m.summarize(_run(100.0, 105.0, 115.0), 20.0, SLO)
    assert ft["requests"] == 20 and ft["completed"] == 20 and ft["lost"] == 0
    assert ft["throughput_tokens_per_s"] == pytest.approx(80 / 20)
    assert [r["latency_s"] for r in ft["recovery"]] == [0.5]
    assert [r["latency_s"] for r in rr["recovery"]] == [10.0]
    assert rr["failed_attempts"] == 20
    assert rr["goodput"]["requests_meeting_slo"] == 11  # of the 10 due while down, only the last within 2 s
    # the recovery window is [105, 115]: the 10 due in it and the one due at its end
    assert rr["latency"]["recovery"]["completed"] == 11 and rr["latency"]["before"]["completed"] == 5
    assert len(ft["series"]) == 25 and ft["series"][:2] == [(1.0, 4.0), (2.0, 4.0)]
    r = m.ratios(ft, rr)
    assert r["recovery_rr_over_ft"] == 20.0 and not r["met"]["recovery_rr_over_ft"]
    assert r["ft_lost"] == 0 and r["met"]["ft_lost"]
    assert r["throughput_ft_over_rr"] == pytest.approx(ft["throughput_tokens_per_s"] / rr["throughput_tokens_per_s"],
                                                       abs=0.01)
    assert not r["throughput_ratio_unbounded"]
    # a baseline that served no token in the window: no finite ratio, and the target is met by any throughput
    idle = {**rr, "throughput_tokens_per_s": 0.0}
    r = m.ratios(ft, idle)
    assert r["throughput_ft_over_rr"] is None and r["throughput_ratio_unbounded"] and r["met"]["throughput_ft_over_rr"]
    assert not m.ratios({**ft, "throughput_tokens_per_s": 0.0}, idle)["met"]["throughput_ft_over_rr"]
    report = {"config": {"tp": 4, "rate": 1.0, "arrivals": "poisson", "max_new_tokens": 4, "window_s": 20.0,
                         "trace_summary": "1 kill", "slo_ttft_s": 2.0, "slo_tpot_s": 0.5},
              "systems": {"ft": ft, "rr": idle}, "ratios": r}
    assert "throughput sglang-ft / restart-and-reload: unbounded (restart-and-reload served no token in the " \
           "window) (target >= 2.5x: met)" in m.table(report)


def test_table_and_plot(tmp_path):
    systems = {k: m.summarize(_run(0.0, 5.0, end), 20.0, SLO) for k, end in (("ft", 5.5), ("rr", 15.0),
                                                                           ("none", 25.0))}
    report = {"config": {"tp": 4, "rate": 1.0, "arrivals": "poisson", "max_new_tokens": 4, "window_s": 20.0,
                         "trace_summary": "1 kill, 1 rejoin", "slo_ttft_s": 2.0, "slo_tpot_s": 0.5},
              "trace": {"events": [{"t_s": 5.0, "worker": 1, "event": "kill"},
                                   {"t_s": 15.0, "worker": 1, "event": "rejoin"}]},
              "systems": systems, "ratios": m.ratios(systems["ft"], systems["rr"])}
    text = m.table(report)
    assert text.splitlines()[0].endswith("| sglang-ft | restart-and-reload | no recovery |")
    assert "recovery latency per fault (s) | 0.5 | 10 |" in text and "NOT met" in text
    json.dumps(report)  # what main writes
    m.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arrival_times_are_seeded_and_at_the_rate():
    a = arrival_times(1.5, 60.0, seed=0)
    assert a == arrival_times(1.5, 60.0, seed=0) and a != arrival_times(1.5, 60.0, seed=1)
    assert all(0 < x < 60 for x in a) and a == sorted(a)
    long = arrival_times(2.0, 20_000.0, seed=3)
    assert len(long) / 20_000 == pytest.approx(2.0, rel=0.02)
    gaps = np.diff(long)
    assert gaps.mean() == pytest.approx(0.5, rel=0.02) and gaps.std() == pytest.approx(0.5, rel=0.05)  # exponential
    uniform = arrival_times(1.5, 4.0, seed=0, process="uniform")
    assert uniform == pytest.approx([0, 2 / 3, 4 / 3, 2, 8 / 3, 10 / 3])
    assert len(arrival_times(2.0, 60.0, seed=0, process="uniform")) == 120
    with pytest.raises(ValueError):
        arrival_times(0, 10, 0)
    with pytest.raises(ValueError):
        arrival_times(1, 10, 0, process="bursty")


def test_the_traces_it_draws_are_valid():
    quick = under_faults.make_trace(4, under_faults.PRESETS["quick"])
    assert parse_trace(dumps_trace(quick)) == quick  # validated on parsing
    events = [e.event for e in quick.events]
    assert quick.header.window_s == 45 and events == ["kill", "rejoin"]
    assert quick.events[0].t_s >= 5  # some load before the first fault
    full = under_faults.make_trace(4, under_faults.PRESETS["full"])
    assert parse_trace(dumps_trace(full)) == full
    assert {"kill", "hang", "resume", "rejoin"} <= {e.event for e in full.events}
    assert under_faults.make_trace(4, under_faults.PRESETS["quick"]) == quick  # fixed seed


def test_open_load_records_retries_and_losses():
    """Every third request's first attempt is cut after 2 tokens; a request whose prompt asks for it never
    completes. The others complete with all their tokens."""
    app, attempts = FastAPI(), {}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        n, text = body["sampling_params"]["max_new_tokens"], body["text"]
        attempts[text] = attempts.get(text, 0) + 1
        index = int(text.split()[1])
        cut = index == 4 or (index % 3 == 0 and attempts[text] == 1)

        def chunks():
            for k in range(1, n + 1):
                if cut and k == 3:
                    yield b'data: {"error": {"message": "worker lost"}}\n\n'
                    return
                yield b"data: " + json.dumps({"output_ids": list(range(k))}).encode() + b"\n\n"
                time.sleep(0.01)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    prompts = [f"request {i}" for i in range(8)]
    with serving(app) as url:
        load = OpenLoad(url, prompts, 5, [0.02 * i for i in range(8)], retry_s=0.05).start()
        time.sleep(0.6)
        records = load.finish(drain_s=0.5)
    assert [r.sent for r in records] == [True] * 8
    assert [r.lost for r in records] == [i == 4 for i in range(8)]
    done = [r for r in records if not r.lost]
    assert all(r.tokens == 5 and len(r.token_times) == 5 and r.ttft > 0 and r.tpot > 0 for r in done)
    assert [r.failed_attempts > 0 for r in records] == [i % 3 == 0 or i == 4 for i in range(8)]
    assert records[3].failed_attempts == 1 and records[3].wasted_tokens == 2
    assert records[3].attempt_sent > records[3].arrival  # TTFT counts from the first send, across the retry
    assert records[3].ttft > records[1].ttft


def test_open_load_stops_sending_when_finished():
    with serving(FastAPI()) as url:  # no /generate: every attempt fails with 404
        load = OpenLoad(url, ["p"], 4, [0.0, 30.0], retry_s=0.05).start()
        time.sleep(0.3)
        records = load.finish(drain_s=0.0)
    assert records[0].sent and records[0].lost and records[0].failed_attempts >= 2
    assert not records[1].sent and records[1].lost and records[1].failed_attempts == 0


def test_closed_load_staggers_each_clients_length_and_checks_the_reference_prefix():
    """`Load(stagger_tokens=k)`: client i asks for k * i tokens fewer (so clients drift out of lockstep) and its
    output is checked against the reference's first tokens; a wrong token still counts as a mismatch."""
    app, asked = FastAPI(), []

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        n = body["sampling_params"]["max_new_tokens"]
        asked.append((body["text"], n))
        ids = [7] * n if body["text"] == "wrong" else list(range(n))

        def chunks():
            for k in range(1, n + 1):
                yield b"data: " + json.dumps({"output_ids": ids[:k]}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    expected = {"p": list(range(10)), "wrong": list(range(10))}
    with serving(app) as url:
        load = Load(url, ["p"], 10, expected=expected, stagger_tokens=3).start(3)
        time.sleep(0.3)
        load.finish(timeout_s=5)
        assert load.completed > 3 and load.mismatched == 0 and load.failed_attempts == 0
        assert {n for _, n in asked} == {10, 7, 4}
        wrong = Load(url, ["wrong"], 10, expected=expected, stagger_tokens=3).start(2)
        time.sleep(0.2)
        wrong.finish(timeout_s=5)
    assert wrong.completed > 0 and wrong.mismatched == wrong.completed


def test_a_fault_that_reached_no_process_is_not_a_recovery():
    run = _run(100.0, 105.0, 105.5)
    # a second kill of the same worker, already dead: the replay skipped it, so nothing recovered from it
    run["replay"].append({"t_s": 8.0, "worker": 1, "event": "kill", "outcome": "skipped: worker 1 has no process",
                          "at": 108.0, "pid": None})
    result = m.summarize(run, 20.0, SLO)
    assert [r["latency_s"] for r in result["recovery"]] == [0.5]
    assert result["faults_not_delivered"] == [{"t_s": 8.0, "worker": 1, "event": "kill",
                                               "outcome": "skipped: worker 1 has no process"}]
    assert result["mean_recovery"] == {"s": 0.5, "lower_bound": False}


def test_pacing_keeps_each_faults_followers_with_it_and_grows_the_window():
    trace = parse_trace("\n".join([
        '{"format": "sglang-ft-fault-trace", "version": 1, "source": "t", "window_s": 60, "tp_size": 4, "seed": 1}',
        '{"t_s": 10, "worker": 1, "event": "kill"}', '{"t_s": 20, "worker": 2, "event": "hang"}',
        '{"t_s": 25, "worker": 2, "event": "resume"}', '{"t_s": 30, "worker": 1, "event": "rejoin"}',
        '{"t_s": 50, "worker": 3, "event": "kill"}']))
    paced = under_faults.paced(trace, 40.0)
    # the hang moves from 20 to 50 (+30): its resume and every later event move by 30; the kill at 50 + 30 = 80 is
    # already 30 after the hang at 50, so it moves 10 more, to 90 (40 after)
    assert [(e.t_s, e.event) for e in paced.events] == [(10, "kill"), (50, "hang"), (55, "resume"), (60, "rejoin"),
                                                        (90, "kill")]
    assert paced.header.window_s == 100 and paced.header.params["min_fault_gap_s"] == 40.0
    assert under_faults.paced(trace, 5.0).events == trace.events  # already paced: unchanged
    faults = [e.t_s for e in under_faults.paced(under_faults.make_trace(4, under_faults.PRESETS["full"]), 100.0).events
              if e.event in m.FAULTS]
    assert all(b - a >= 100.0 - 1e-3 for a, b in zip(faults, faults[1:]))  # the trace keeps milliseconds


def test_reanalysis_drops_undelivered_faults_and_names_what_dominates(tmp_path):
    systems = {k: m.summarize(_run(0.0, 5.0, end), 20.0, SLO) for k, end in (("ft", 5.5), ("rr", 15.0))}
    for result in systems.values():  # as a run stored before the measures changed: a skipped fault kept
        result["recovery"].append({"t_s": 9.0, "worker": 1, "event": "kill", "latency_s": 0.2,
                                   "outcome": "skipped: worker 1 has no process"})
        result.pop("faults_not_delivered")
    systems["ft"]["system"] = {"recoveries": [{"cause": "failure", "detect_ms": 400, "recover_ms": 300}]}
    systems["rr"]["system"] = {"restarts": [{"outcome": "healthy", "startup_s": 8.0, "detected_s": 6.0,
                                             "healthy_s": 15.0}]}
    report = {"date": "2026-11-30", "config": {"tp": 4, "rate": 1.0, "arrivals": "poisson", "max_new_tokens": 4,
                                               "window_s": 20.0, "trace_summary": "2 kill", "slo_ttft_s": 2.0,
                                               "slo_tpot_s": 0.5},
              "trace": {"events": [{"t_s": 5.0, "worker": 1, "event": "kill"},
                                   {"t_s": 9.0, "worker": 1, "event": "kill"}]}, "systems": systems}
    stored = tmp_path / "in.json"
    stored.write_text(json.dumps(report))
    out = under_faults.reanalyse(stored, tmp_path / "out")
    assert out["systems"]["ft"]["mean_recovery"]["s"] == 0.5 and out["systems"]["rr"]["mean_recovery"]["s"] == 10.0
    assert out["ratios"]["recovery_rr_over_ft"] == 20.0
    assert out["reanalysed"]["of_run_dated"] == "2026-11-30"
    text = m.table(out)
    assert "faults not delivered (the worker had no process), not counted as recoveries: sglang-ft 1, " \
           "restart-and-reload 1" in text
    assert "restart-and-reload: 10 s mean recovery, of which SGLang's relaunch 8 s mean" in text
    assert "detection 400 ms and the in-place regroup 300 ms" in text
    assert (tmp_path / "out" / "under_faults.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
