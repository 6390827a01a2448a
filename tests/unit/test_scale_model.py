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
        assert r["bytes_kept"] + r["bytes_p2p"] + r["bytes_reloaded"] == sum(weights_held(model, s)
                                                                             for s in layout.shards)
        # the lost GPU's one KV head comes back from the host store: its KV for every in-flight token
        assert r["kv_bytes_restored"] == p.in_flight_tokens * model.num_hidden_layers * 2 * model.head_dim * 2
        assert sorted(r["kv_heads_per_rank"]) == [1] * 6 + [2]  # 8 KV heads over 7: uneven


def test_recovery_time_grows_with_the_bytes_moved():
    model = MODELS["Llama-3-8B"]
    p = sm.default_params(MEASURED, "vm-disk")
    held = dict(enumerate(TPLayout.even(model.shape(), 8).shards))
    base = sm.sglang_ft_recovery(model, held, 3, p)
    deeper = replace(model, num_hidden_layers=2 * model.num_hidden_layers)
    held2 = dict(enumerate(TPLayout.even(deeper.shape(), 8).shards))
    twice = sm.sglang_ft_recovery(deeper, held2, 3, p)
    moved = lambda r: r["bytes_p2p"] + r["bytes_reloaded"]  # noqa: E731
    assert moved(twice) > moved(base) and twice["recovery_s"] > base["recovery_s"]
    # one shared disk: the weights' time is proportional to the bytes reloaded (the layers double, the vocabulary
    # does not)
    assert twice["terms_s"]["weights"] / base["terms_s"]["weights"] == pytest.approx(
        twice["bytes_reloaded"] / base["bytes_reloaded"])
    assert 1.8 < twice["bytes_reloaded"] / base["bytes_reloaded"] < 2
    # more tokens in flight, more KV to restore, longer
    more_kv = sm.sglang_ft_recovery(model, held, 3, replace(p, requests=4 * p.requests))
    assert more_kv["kv_bytes_restored"] == 4 * base["kv_bytes_restored"]
    assert more_kv["terms_s"]["kv_restore"] == pytest.approx(4 * base["terms_s"]["kv_restore"])
    # a faster disk moves the same bytes sooner
    fast = sm.sglang_ft_recovery(model, held, 3, sm.default_params(MEASURED, "nvme"))
    assert moved(fast) == moved(base) and fast["recovery_s"] < base["recovery_s"]
    # across models, with the same links: more bytes reloaded, more time on weights
    rows = [sm.project(m, p)[0]["sglang_ft"] for m in sm.MODELS]
    by_bytes = sorted(rows, key=lambda r: r["bytes_reloaded"])
    assert [r["terms_s"]["weights"] for r in by_bytes] == sorted(r["terms_s"]["weights"] for r in rows)


def test_shared_disk_time_is_the_reloaded_bytes_over_the_disk():
    model = MODELS["Llama-3-70B"]
    p = sm.default_params(MEASURED, "vm-disk")
    r = sm.project(model, p)[0]["sglang_ft"]
    assert r["terms_s"]["weights"] == pytest.approx(r["bytes_reloaded"] / (MEASURED["checkpoint_reads"]
                                                                           ["cold_to_device"] * 1e9))
    assert r["recovery_s"] == pytest.approx(sum(r["terms_s"].values()))


def test_losses_chain_from_the_previous_layout():
    rows = sm.project(MODELS["Qwen2-72B"], sm.default_params(MEASURED, "page-cache"), lose=[3, 5, 0])
    assert [r["sglang_ft"]["tp"] for r in rows] == [7, 6, 5]
    assert [r["dead_worker"] for r in rows] == [3, 5, 0]
    worst = sm.project(MODELS["Qwen2-72B"], sm.default_params(MEASURED, "page-cache"))
    for given, chosen in zip(rows[:1], worst[:1]):  # same starting layout: the worst case is no faster
        assert chosen["sglang_ft"]["recovery_s"] >= given["sglang_ft"]["recovery_s"]


def test_restart_and_reload_reads_the_whole_checkpoint_at_a_divisor_width():
    model = MODELS["Llama-3-70B"]
    assert [sm.restart_width(model, g) for g in (8, 7, 6, 5, 4, 3)] == [8, 4, 4, 4, 4, 2]
    p = sm.default_params(MEASURED, "nvme")
    rr = sm.restart_and_reload(model, 7, p)
    assert rr["tp"] == 4 and rr["bytes_reloaded"] == model.parameters() * 2
    assert rr["terms_s"]["checkpoint_read"] == pytest.approx(rr["bytes_reloaded"] / 7e9)
    assert rr["terms_s"]["process_start"] == MEASURED["process_start"]["python_import_torch_cuda_context_s"]
    # re-prefill: about 2 FLOPs per active weight per token, at the assumed share of the bf16 peak
    approx = 2 * model.parameters() * p.in_flight_tokens / (4 * p.mfu * 989e12)
    assert rr["terms_s"]["re_prefill"] == pytest.approx(approx, rel=0.15)


def test_cli_writes_results_with_sources(tmp_path, capsys):
    assert sm.main(["--full", "--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| model |") and "AnchorTP: TFS up to 11x lower" in table
    data = json.loads((tmp_path / "scale_model.json").read_text())
    assert len(data["rows"]) == 3 * len(sm.MODELS) * 3
    assert {r["disk"] for r in data["rows"]} == {"vm-disk", "nvme", "page-cache"}
    assert all(r["ratio"] > 1 for r in data["rows"])
    md = (tmp_path / "scale_model.md").read_text()
    assert "## Assumptions and sources" in md and "450 GB/s per direction" in md and "FailSafe" in md
    assert sm.main(["--out-dir", str(tmp_path), "--disk", "vm-disk", "--lose", "0,1,2"]) == 0
    assert {r["disk"] for r in json.loads((tmp_path / "scale_model.json").read_text())["rows"]} == {"vm-disk"}
    with pytest.raises(SystemExit):
        sm.main(["--out-dir", str(tmp_path), "--lose", "0,0,1"])


def test_graph_capture_is_charged_to_both_systems_alike():
    model = MODELS["Llama-3-70B"]
    p = sm.default_params(MEASURED, "nvme")
    row = sm.project(model, p)[0]
    ft, rr = row["sglang_ft"], row["restart_and_reload"]
    # the documented whole-capture time (sgl-project/sglang#10088), one share per decode batch size
    assert ft["terms_s"]["graph_capture"] == rr["terms_s"]["graph_capture"] == pytest.approx(12.11)
    assert p.capture_sizes == len([1, 2, 4, 8, 12] + list(range(16, 257, 8))) == 36
    # sglang-ft serves eagerly before its capture ends; restart-and-reload's 20 s of warm-up include its capture
    assert ft["recovery_s"] - ft["serving_resumes_s"] == pytest.approx(12.11)
    assert rr["terms_s"]["warmup"] + rr["terms_s"]["graph_capture"] == pytest.approx(p.warmup_s)
    assert row["ratio_without_warmup"] == pytest.approx(
        (rr["recovery_s"] - p.warmup_s) / ft["serving_resumes_s"])


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
