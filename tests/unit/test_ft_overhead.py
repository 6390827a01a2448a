"""benchmark/ft_overhead.py's arithmetic (the servers run in the benchmark, not here)."""

import pytest

from benchmark import ft_overhead as overhead


def test_percentiles_are_nearest_rank_on_sorted_values():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert overhead.percentile(values, 50) == 0.3
    assert overhead.percentile(values, 99) == 0.5 and overhead.percentile(values, 0) == 0.1
    assert overhead.percentile([], 99) is None


def test_rounds_are_pooled_by_time_not_averaged():
    runs = [{"tokens_per_s": 100.0, "elapsed_s": 10.0, "failures": 0, "latencies": [0.1] * 30},
            {"tokens_per_s": 50.0, "elapsed_s": 30.0, "failures": 2, "latencies": [0.3] * 45}]
    summary = overhead.summarize(runs)
    assert summary["tokens_per_s"] == pytest.approx((1000 + 1500) / 40)  # not (100 + 50) / 2
    assert summary["requests"] == 75 and summary["failures"] == 2
    assert summary["latency_p50_s"] == 0.3 and summary["latency_p99_s"] == 0.3


def test_bad_flags_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        overhead.main(["--rounds", "0"])
    assert exit_info.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_cpu_seconds_count_every_process_of_the_server():
    """A server's CPU time is its launcher's and its children's (schedulers, the FT controller, the store)."""
    import subprocess
    import sys
    import time

    busy = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {busy!r}])\ntime.sleep(30)"])
    try:
        time.sleep(3.0)  # the child has burnt its 0.6 s of CPU by now
        assert overhead.cpu_seconds(parent.pid) >= 0.6
    finally:
        import psutil

        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()


def test_cpu_per_token_ratio_averages_rounds_and_skips_missing_ones():
    assert overhead._ratio([2.0, 4.0], [3.0, 3.0]) == 1.0
    assert overhead._ratio([2.0, None], [4.0]) == 0.5
    assert overhead._ratio([None], [4.0]) is None
