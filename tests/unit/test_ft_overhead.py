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
