"""The scale model (benchmark/scale_model.py): public model shapes, planner-derived bytes, and recovery times that
follow the bytes they move."""

import json
from dataclasses import replace

import pytest

from ft.partition import TPLayout
from ft.planner import bytes_per_unit

from benchmark import scale_model as sm

MODELS = {m.name: m for m in sm.MODELS}
MEASURED = sm.load_measured()


def weights_held(model, shard) -> int:
    unit = bytes_per_unit(model.shape(), model.tie_word_embeddings)
    return sum(unit[d] * (getattr(shard, d)[1] - getattr(shard, d)[0]) for d in unit)


@pytest.mark.parametrize("name, billions", [("Llama-3-8B", 8.0), ("Llama-3-70B", 70.6), ("Qwen2-72B", 72.7),
                                            ("Mixtral-8x7B", 46.7)])
def test_model_shapes_give_the_published_parameter_counts(name, billions):
    model = MODELS[name]
    assert model.parameters() / 1e9 == pytest.approx(billions, rel=0.02)
    # what the planner partitions is all of it but the replicated norms and router (and Qwen2's biases)
    unit = bytes_per_unit(model.shape(), model.tie_word_embeddings)
    shape = model.shape()
    partitioned = (unit["kv_heads"] * shape.num_key_value_heads + unit["mlp_columns"] * shape.intermediate_size
                   + unit["vocab_rows"] * shape.vocab_size) / model.dtype_bytes
    assert partitioned == pytest.approx(model.parameters(), rel=1e-3) and partitioned < model.parameters()


def test_mixtral_active_parameters_and_expert_columns():
    mixtral = MODELS["Mixtral-8x7B"]
    shape = mixtral.shape()
    assert (shape.intermediate_size, shape.num_experts) == (14336, 8)
    # a unit of MLP columns is that column of all 8 experts: the planner's bytes are every expert's weights
    mlp_bytes = bytes_per_unit(shape)["mlp_columns"] * shape.intermediate_size
    assert mlp_bytes == 32 * 8 * 3 * 4096 * 14336 * 2
    assert mixtral.parameters(active=True) / 1e9 == pytest.approx(12.9, rel=0.02)  # top-2 of 8 experts
    assert MODELS["Llama-3-8B"].parameters(active=True) == MODELS["Llama-3-8B"].parameters()


# A synthetic decoder small enough to count by hand: hidden 64, MLP 128, 2 layers, 4 query heads over 2 KV heads
# (head_dim 16), vocabulary 100, bf16. Per layer: q and o 2 x 64 x 64, k and v 2 x 64 x 32, MLP 3 x 64 x 128, two
# norms of 64; then a final norm of 64 and untied embeddings 2 x 100 x 64: 86,848 parameters, 173,696 bytes, of which
# the norms' 2 x 128 + 64 = 320 parameters are replicated and every other one is split between two ranks.
TINY = sm.Model("tiny", "hand-made", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100)
TINY_CHECKPOINT = 173_696
TINY_HALF_SPLIT = (86_848 - 320) * 2 // 2  # worker 1's share at TP 2: half of every split parameter, in bytes
TINY_KV_HEAD_10_TOKENS = 10 * 2 * 2 * 16 * 2  # tokens x layers x (K, V) x head_dim x bf16
# prefill of 1 request x 10 tokens: 2 FLOPs per weight but the embeddings' per token (74,048 weights), causal
# attention 2 x layers x heads x head_dim x T(T+1), the LM head once
TINY_PREFILL_FLOPS = 2 * 74_048 * 10 + 2 * 2 * 4 * 16 * 10 * 11 + 2 * 100 * 64


def tiny_params(**overrides) -> sm.Params:
    """Round rates: one shared disk at 1 GB/s, the host copy at 4 GB/s per rank, the KV store at 2 GB/s."""
    return replace(sm.Params(sm.Disk("disk", 1.0, True, "test"), kv_host_gbps=2.0, process_start_s=3.0,
                             weights_host="pinned", weights_host_gbps=4.0, detect_s=0.5, rebuild_s=0.25,
                             park_s=0.125, warmup_s=1.0, capture_per_size_s=0.5, capture_sizes=4, mfu=0.5,
                             requests=1, tokens=10, nvlink_gbps=100.0), **overrides)


def test_tiny_model_counts_by_hand():
    assert TINY.parameters() * 2 == TINY_CHECKPOINT
    assert sm.prefill_flops(TINY, 1, 10) == TINY_PREFILL_FLOPS == 1_521_920


def test_sglang_ft_by_hand_lost_share_from_the_host_copy():
    """TP 2 -> 1: the survivor keeps its half and reads the other half, which only the lost worker held, from the
    node's host copy over its own link; the lost KV head comes from the backup store."""
    p = tiny_params()
    held = dict(enumerate(TPLayout.even(TINY.shape(), 2).shards))
    r = sm.sglang_ft_recovery(TINY, held, 1, p)
    assert (r["bytes_p2p"], r["bytes_reloaded"], r["bytes_from_host_copy"], r["bytes_from_disk"]) == (
        0, TINY_HALF_SPLIT, TINY_HALF_SPLIT, 0)
    assert r["kv_bytes_restored"] == TINY_KV_HEAD_10_TOKENS
    weights, kv = TINY_HALF_SPLIT / 4e9, TINY_KV_HEAD_10_TOKENS / 2e9
    assert r["terms_s"] == pytest.approx({"detect": 0.5, "groups": 0.25, "park": 0.125, "weights": weights,
                                          "kv_restore": kv, "graph_capture": 2.0})
    assert r["serving_resumes_s"] == pytest.approx(0.875 + weights + kv)
    assert r["full_speed_s"] == pytest.approx(0.875 + weights + kv + 2.0)  # the same capture restart pays
    # the copy off: the same bytes from the one shared disk at 1 GB/s
    off = sm.sglang_ft_recovery(TINY, held, 1, tiny_params(weights_host="off"))
    assert (off["bytes_from_host_copy"], off["bytes_from_disk"]) == (0, TINY_HALF_SPLIT)
    assert off["terms_s"]["weights"] == pytest.approx(TINY_HALF_SPLIT / 1e9)


def test_restart_and_reload_by_hand():
    """One GPU left: a fresh TP 1 server reads the whole checkpoint, warms up, captures, re-prefills."""
    p = tiny_params()
    rr = sm.restart_and_reload(TINY, 1, p)
    prefill = TINY_PREFILL_FLOPS / (0.5 * 989e12)
    assert rr["tp"] == 1 and rr["bytes_reloaded"] == TINY_CHECKPOINT
    assert rr["terms_s"] == pytest.approx({"detect": 0.5, "process_start": 3.0, "checkpoint_read": TINY_CHECKPOINT
                                           / 1e9, "warmup": 1.0, "graph_capture": 2.0, "re_prefill": prefill})
    assert rr["serving_resumes_s"] == rr["full_speed_s"] == pytest.approx(6.5 + TINY_CHECKPOINT / 1e9 + prefill)
    # the sensitivity: restart's loader reading the host copy at its rate per rank
    host = sm.restart_and_reload(TINY, 1, p, from_host_copy=True)
    assert host["terms_s"]["checkpoint_read"] == pytest.approx(TINY_CHECKPOINT / 4e9)
    # no host copy: nothing faster to read from
    off = sm.restart_and_reload(TINY, 1, tiny_params(weights_host="off"), from_host_copy=True)
    assert off["terms_s"]["checkpoint_read"] == pytest.approx(TINY_CHECKPOINT / 1e9)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_loss_at_tp8_reloads_at_most_one_gpus_share(name):
    model = MODELS[name]
    p = sm.default_params(MEASURED, "nvme")
    layout = TPLayout.even(model.shape(), 8)
    held = dict(enumerate(layout.shards))
    for dead in range(8):
        r = sm.sglang_ft_recovery(model, held, dead, p)
        share = weights_held(model, layout.shards[dead])
        assert 0 < r["bytes_reloaded"] <= share <= max(weights_held(model, s) for s in layout.shards)
        assert r["bytes_from_host_copy"] == r["bytes_reloaded"] and r["bytes_from_disk"] == 0
        assert r["bytes_kept"] + r["bytes_p2p"] + r["bytes_reloaded"] == sum(weights_held(model, s)
                                                                             for s in layout.shards)
        # the lost share from the pinned host copy: no slower than one rank reading all of it at the measured rate
        assert r["terms_s"]["weights"] <= max(r["bytes_reloaded"] / 53.04e9, r["bytes_p2p"] / 450e9) + 1e-12
        # the lost GPU's one KV head comes back from the host store: its KV for every in-flight token
        assert r["kv_bytes_restored"] == p.in_flight_tokens * model.num_hidden_layers * 2 * model.head_dim * 2
        assert sorted(r["kv_heads_per_rank"]) == [1] * 6 + [2]  # 8 KV heads over 7: uneven


def test_recovery_time_grows_with_the_bytes_moved():
    model = MODELS["Llama-3-8B"]
    p = sm.default_params(MEASURED, "vm-disk", weights_host="off")
    held = dict(enumerate(TPLayout.even(model.shape(), 8).shards))
    base = sm.sglang_ft_recovery(model, held, 3, p)
    deeper = replace(model, num_hidden_layers=2 * model.num_hidden_layers)
    held2 = dict(enumerate(TPLayout.even(deeper.shape(), 8).shards))
    twice = sm.sglang_ft_recovery(deeper, held2, 3, p)
    moved = lambda r: r["bytes_p2p"] + r["bytes_reloaded"]  # noqa: E731
    assert moved(twice) > moved(base) and twice["serving_resumes_s"] > base["serving_resumes_s"]
    # one shared disk: the weights' time is proportional to the bytes reloaded (the layers double, the vocabulary
    # does not)
    assert twice["terms_s"]["weights"] / base["terms_s"]["weights"] == pytest.approx(
        twice["bytes_reloaded"] / base["bytes_reloaded"])
    assert 1.8 < twice["bytes_reloaded"] / base["bytes_reloaded"] < 2
    # more tokens in flight, more KV to restore, longer
    more_kv = sm.sglang_ft_recovery(model, held, 3, replace(p, requests=4 * p.requests))
    assert more_kv["kv_bytes_restored"] == 4 * base["kv_bytes_restored"]
    assert more_kv["terms_s"]["kv_restore"] == pytest.approx(4 * base["terms_s"]["kv_restore"])
    # a faster source moves the same bytes sooner: NVMe, then the pageable and the pinned host copy
    times = [sm.sglang_ft_recovery(model, held, 3, sm.default_params(MEASURED, "vm-disk", weights_host=w))
             for w in ("off", "pageable", "pinned")]
    fast = sm.sglang_ft_recovery(model, held, 3, sm.default_params(MEASURED, "nvme", weights_host="off"))
    assert moved(fast) == moved(base) and fast["serving_resumes_s"] < base["serving_resumes_s"]
    assert [t["terms_s"]["weights"] for t in times] == sorted((t["terms_s"]["weights"] for t in times), reverse=True)
    # across models, with the same links: more bytes reloaded, more time on weights
    rows = [sm.project(m, p)[0]["sglang_ft"] for m in sm.MODELS]
    by_bytes = sorted(rows, key=lambda r: r["bytes_reloaded"])
    assert [r["terms_s"]["weights"] for r in by_bytes] == sorted(r["terms_s"]["weights"] for r in rows)


def test_shared_disk_time_is_the_reloaded_bytes_over_the_disk():
    model = MODELS["Llama-3-70B"]
    p = sm.default_params(MEASURED, "vm-disk", weights_host="off")
    r = sm.project(model, p)[0]["sglang_ft"]
    assert r["terms_s"]["weights"] == pytest.approx(r["bytes_reloaded"] / (MEASURED["checkpoint_reads"]
                                                                           ["cold_to_device"] * 1e9))
    assert r["serving_resumes_s"] == pytest.approx(sum(r["terms_s"].values()) - r["terms_s"]["graph_capture"])


def test_losses_chain_from_the_previous_layout():
    rows = sm.project(MODELS["Qwen2-72B"], sm.default_params(MEASURED, "page-cache"), lose=[3, 5, 0])
    assert [r["sglang_ft"]["tp"] for r in rows] == [7, 6, 5]
    assert [r["dead_worker"] for r in rows] == [3, 5, 0]
    worst = sm.project(MODELS["Qwen2-72B"], sm.default_params(MEASURED, "page-cache"))
    for given, chosen in zip(rows[:1], worst[:1]):  # same starting layout: the worst case is no faster
        assert chosen["sglang_ft"]["serving_resumes_s"] >= given["sglang_ft"]["serving_resumes_s"]


def test_restart_and_reload_reads_the_whole_checkpoint_at_a_divisor_width():
    model = MODELS["Llama-3-70B"]
    assert [sm.restart_width(model, g) for g in (8, 7, 6, 5, 4, 3)] == [8, 4, 4, 4, 4, 2]
    p = sm.default_params(MEASURED, "nvme")
    rr = sm.restart_and_reload(model, 7, p)
    assert rr["tp"] == 4 and rr["bytes_reloaded"] == model.parameters() * 2
    assert rr["terms_s"]["checkpoint_read"] == pytest.approx(rr["bytes_reloaded"] / 7e9)
    assert rr["terms_s"]["process_start"] == MEASURED["process_start"]["python_import_torch_cuda_context_s"]
    # from the host copy: each of the 4 ranks reads its quarter at the measured pinned rate
    host = sm.restart_and_reload(model, 7, p, from_host_copy=True)
    assert host["terms_s"]["checkpoint_read"] == pytest.approx(rr["bytes_reloaded"] / 4 / 53.04e9)
    # re-prefill: about 2 FLOPs per active weight per token, at the assumed share of the bf16 peak
    approx = 2 * model.parameters() * p.in_flight_tokens / (4 * p.mfu * 989e12)
    assert rr["terms_s"]["re_prefill"] == pytest.approx(approx, rel=0.15)


def test_defaults_name_the_measured_stages():
    p = sm.default_params(MEASURED)
    assert (p.weights_host, p.weights_host_gbps, p.failure, p.detect_s, p.rebuild_s, p.warmup_s) == (
        "pinned", 53.04, "process-exit", 0.1, 0.07, 0.0)
    hang = sm.default_params(MEASURED, failure="hang")
    assert hang.detect_s == 0.6
    assert sm.default_params(MEASURED, weights_host="pageable").weights_host_gbps == 5.7


def test_cli_writes_results_with_sources(tmp_path, capsys):
    assert sm.main(["--full", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| failure | disk |") and "| **serving resumes** |" in out
    data = json.loads((tmp_path / "scale_model.json").read_text())
    assert len(data["rows"]) == 2 * 3 * len(sm.MODELS) * 3
    assert {r["disk"] for r in data["rows"]} == {"vm-disk", "nvme", "page-cache"}
    assert {r["failure"] for r in data["rows"]} == {"process-exit", "hang"}
    assert all(r["ratio"] > 1 and r["ratio_full_speed"] > 1 for r in data["rows"])
    # detection is charged to both sides: a hang adds the same 0.5 s to each
    by_key = {(r["failure"], r["disk"], r["model"], r["losses"]): r for r in data["rows"]}
    hang, exit_ = by_key[("hang", "nvme", "Llama-3-70B", 1)], by_key[("process-exit", "nvme", "Llama-3-70B", 1)]
    for side in ("sglang_ft", "restart_and_reload", "restart_from_host_copy"):
        assert hang[side]["serving_resumes_s"] - exit_[side]["serving_resumes_s"] == pytest.approx(0.5)
    assert data["headline"]["ratio_serving_resumes"] == exit_["ratio"] and data["headline"]["target"] == 30
    md = (tmp_path / "scale_model.md").read_text()
    for text in ("## Assumptions and sources", "450 GB/s per direction", "FailSafe", "Which costs each side pays",
                 "issue 26's target", "stream_stall_2026-12-03_groups.json", "53.04 GB/s"):
        assert text in md
    assert sm.main(["--out-dir", str(tmp_path), "--disk", "vm-disk", "--weights-host", "off", "--lose", "0,1,2"]) == 0
    rows = json.loads((tmp_path / "scale_model.json").read_text())["rows"]
    assert {(r["disk"], r["weights_host"], r["failure"]) for r in rows} == {("vm-disk", "off", "process-exit")}
    assert all(r["sglang_ft"]["bytes_from_disk"] == r["sglang_ft"]["bytes_reloaded"] for r in rows)
    for bad in (["--lose", "0,0,1"], ["--weights-host", "nvram"], ["--detect-s", "-1"], ["--mfu", "0"]):
        with pytest.raises(SystemExit):
            sm.main(["--out-dir", str(tmp_path), *bad])
    assert "--detect-s must not be negative" in capsys.readouterr().err


def test_graph_capture_is_charged_to_both_systems_alike():
    model = MODELS["Llama-3-70B"]
    p = sm.default_params(MEASURED, "nvme", warmup_s=3.0)
    row = sm.project(model, p)[0]
    ft, rr = row["sglang_ft"], row["restart_and_reload"]
    # the documented whole-capture time (sgl-project/sglang#10088), one share per decode batch size
    assert ft["terms_s"]["graph_capture"] == rr["terms_s"]["graph_capture"] == pytest.approx(12.11)
    assert p.capture_sizes == len([1, 2, 4, 8, 12] + list(range(16, 257, 8))) == 36
    # sglang-ft serves eagerly before its capture ends; restart captures (and warms up) before it serves
    assert ft["full_speed_s"] - ft["serving_resumes_s"] == pytest.approx(12.11)
    assert rr["full_speed_s"] == rr["serving_resumes_s"] and rr["terms_s"]["warmup"] == 3.0
    assert row["ratio"] == pytest.approx(rr["serving_resumes_s"] / ft["serving_resumes_s"])
    assert row["ratio_full_speed"] == pytest.approx(rr["serving_resumes_s"] / (ft["serving_resumes_s"] + 12.11))
    # the warm-up beyond capture is restart's alone, and none by default
    assert "warmup" not in ft["terms_s"] and sm.default_params(MEASURED).warmup_s == 0


def test_backup_cost_per_decode_step_follows_the_measured_rates():
    model = MODELS["Llama-3-70B"]
    cost = sm.backup_step_cost(model, MEASURED, batch=64, context_tokens=2048)
    # one token per request, 80 layers, K and V, one KV head of 128 bf16 values on every rank at TP 8
    assert cost["bytes_per_step"] == 64 * 80 * 2 * 128 * 2 == 2_621_440
    assert cost["gather_on_device_us"] == pytest.approx(2_621_440 / 253.41e9 * 1e6)
    assert cost["copy_to_pinned_host_us"] == pytest.approx(2_621_440 / 44.84e9 * 1e6)
    # the step reads 1/8 of the 141 GB of weights and 64 x 2048 tokens of one head's KV from HBM at 3.35 TB/s
    assert cost["decode_step_ms_memory_bound"] == pytest.approx((141.1e9 / 8 + 64 * 2048 * 80 * 2 * 128 * 2)
                                                                / 3.35e12 * 1e3, rel=1e-3)
    assert cost["on_the_step_share"] < 0.01 and cost["launches"] == 320
    twice = sm.backup_step_cost(model, MEASURED, batch=128, context_tokens=2048)
    assert twice["bytes_per_step"] == 2 * cost["bytes_per_step"] and twice["launches"] == cost["launches"]
