"""benchmark/balance.py's arithmetic, without a server (the benchmark itself runs one)."""

from __future__ import annotations

import argparse

from benchmark import balance


def worker(rank, kv_heads, busy, used=10):
    return {"rank": rank, "kv_heads": kv_heads, "busy_ms_total": busy, "kv_bytes_used": used}


def test_a_phase_reports_the_straggler_and_the_kv_spread():
    before = [worker(0, 3, 100.0), worker(1, 3, 100.0), worker(2, 2, 100.0)]
    after = [worker(0, 3, 400.0), worker(1, 3, 400.0), worker(2, 2, 300.0)]  # the narrow worker did 2/3 the work
    phase = balance.summarize_phase(before, after, [(1.5, 4.0), (1.5, 6.5), (1.4, 3.0)])
    assert phase["kv_heads"] == [3, 3, 2] and phase["busy_ms"] == [300.0, 300.0, 200.0]
    assert phase["busy_slowest_mean_ratio"] == round(300 / (800 / 3), 3)
    assert phase["kv_max_min_ratio"] == 1.5 and phase["kv_samples"] == 3
    assert phase["kv_blocks_apart_median"] == 4.0 and phase["kv_blocks_apart_max"] == 6.5


def test_a_block_is_sixteen_tokens_of_one_kv_head():
    assert balance.block_bytes({"kv_heads": 2, "kv_bytes_per_token": 512}) == 16 * 256


def test_every_variant_names_real_server_flags():
    from sglang_ft.server_args import FtArgs, add_ft_cli_args

    parser = argparse.ArgumentParser()
    add_ft_cli_args(parser)
    for name, flags in balance.VARIANTS.items():
        ft = FtArgs.from_namespace(parser.parse_args(["--ft", *flags]))
        assert ft.problems() == [], name
        assert ft.splits_remainder == (name != "tp"), name


def test_members_are_the_ranked_workers_that_report_a_load_in_rank_order():
    status = {"workers": [worker(1, 2, 0), {"rank": None, "worker": 3}, worker(0, 2, 0), {"rank": 2, "worker": 2}]}
    assert [w["rank"] for w in balance.members(status)] == [0, 1]


def test_the_workload_shares_prefixes_and_mixes_lengths():
    bodies = [balance.request_body(n) for n in range(6)]
    assert {b["sampling_params"]["max_new_tokens"] for b in bodies} == set(balance.LENGTHS)
    assert len({b["text"][:40] for b in bodies}) == len(balance.PREFIXES)
