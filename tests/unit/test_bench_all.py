"""`make bench`'s summary: read from the benchmarks' own result files (the recorded ones in benchmark/results)."""

import json
from pathlib import Path

from benchmark import bench_all

RESULTS = Path(bench_all.__file__).parent / "results"


def test_summary_reads_every_recorded_result():
    rows = {measure: (value, target) for measure, value, target in bench_all.summary_rows(RESULTS)}
    failover = json.loads((RESULTS / "failover.json").read_text())
    assert rows["failover: TFS, restart-and-reload / sglang-ft"] == (f"{failover['tfs_ratio']}x", ">= 20x")
    assert rows["failover: requests lost by sglang-ft"][0] == str(failover["lost_requests"])
    faults = json.loads((RESULTS / "under_faults.json").read_text())["ratios"]
    throughput = rows["under faults: throughput, sglang-ft / restart-and-reload"][0]
    assert throughput == (f"{faults['throughput_ft_over_rr']}x" if not faults.get("throughput_ratio_unbounded") else
                          "unbounded (restart-and-reload served no token in the window)")
    balance = json.loads((RESULTS / "balance.json").read_text())["variants"]
    assert rows["balance: KV bytes max / min worker after 1 of 4 fails (tp)"] == (
        str(balance["tp"]["after"]["kv_max_min_ratio"]), ">= 1.33 (naive)")
    assert rows["balance: KV bytes max / min worker after 1 of 4 fails (hybrid-load)"] == (
        str(balance["hybrid-load"]["after"]["kv_max_min_ratio"]), "<= 1.05")
    assert rows["balance: KV bytes apart, fullest - emptiest worker, in blocks, median (cyclic)"] == (
        str(balance["cyclic"]["after"]["kv_blocks_apart_median"]), "<= 1")
    stall = json.loads((RESULTS / "stream_stall.json").read_text())
    kill = stall["summary"]["kill"]
    assert rows[f"stream stall: a SIGKILL (TP 4 -> 3) to every in-flight stream's next token, ms, median / max over "
                f"{kill['faults']} faults"] == (f"{kill['stall_ms']['median']} / {kill['stall_ms']['max']}",
                                                "<= 250 (median)")
    assert rows["stream stall: requests lost or wrong"] == (str(stall["load"]["lost"] + stall["load"]["mismatched"]),
                                                           "0")
    assert any(measure.startswith("scale model") for measure in rows)
    assert any(measure.startswith("throughput: --ft / plain, TP 4") for measure in rows)


def test_missing_results_are_left_out_not_invented(tmp_path):
    assert bench_all.summary_rows(tmp_path) == []
    assert bench_all.table([]).count("\n") == 1  # the header only


def test_a_result_older_than_the_run_is_left_out(tmp_path):
    import os
    import shutil
    import time

    shutil.copy(RESULTS / "failover.json", tmp_path / "failover.json")
    os.utime(tmp_path / "failover.json", (time.time() - 3600, time.time() - 3600))  # left by an earlier run
    assert bench_all.summary_rows(tmp_path, since=time.time() - 60) == []
    assert len(bench_all.summary_rows(tmp_path)) == 4  # all of it, when no run start is given


def test_every_benchmark_script_exists_and_only_names_them():
    for _, script, _, _ in bench_all.BENCHMARKS:
        assert (RESULTS.parent / script).exists()
    outcomes = bench_all.run_all(RESULTS, full=False, only={"nothing"})
    assert outcomes == {}


def test_the_quick_run_leaves_out_what_only_the_full_run_has():
    quick_only_skipped = bench_all.run_all(RESULTS, full=False, only={"throughput"})
    assert quick_only_skipped == {}  # nothing launched: throughput runs only under --full
