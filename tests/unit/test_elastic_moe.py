"""The elastic mixture-of-experts block (Mixtral and Qwen2-MoE styles) without a server: every rank's share of the
block, summed as the all-reduce would, equals the transformers block at any width; the partition and the planner
count every expert (and the shared expert) in a unit of MLP columns."""

import glob
import json
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang_ft.tools import make_tiny_model

from ft.model_config import model_shape_of
from ft.partition import ModelShape, TPLayout
from ft.planner import bytes_per_unit, plan_migration

STYLES = {"mixtral": ["--moe"], "qwen2_moe": ["--moe", "--architecture", "qwen2"]}


@pytest.fixture(scope="module", params=list(STYLES))
def moe_model(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    make_tiny_model.main([str(out), *STYLES[request.param], "--num-layers", "1", "--num-experts", "5",
                          "--num-experts-per-tok", "2", "--intermediate-size", "36"])
    return request.param, str(out)


def _shares(config, shape, spans, path):
    """Each rank's ElasticSparseMoe for layer 0, filled from the checkpoint through its own pieces."""
    from sglang_ft.model_loader.lazy_safetensors import lazy_safetensors_iterator
    from sglang_ft.models.weight_pieces import fill_from_checkpoint
    from sglang_ft.models.elastic_moe import MOE_ARCHITECTURES, ElasticSparseMoe

    prefix = f"model.layers.0.{MOE_ARCHITECTURES[config.architectures[0]]}"
    files = sorted(glob.glob(f"{path}/*.safetensors"))
    for lo, hi in spans:
        block = ElasticSparseMoe(config, hi - lo, shape.shared_columns_per_unit, prefix).eval()
        replicated = block.replicated_params(prefix)
        loaded = fill_from_checkpoint(lazy_safetensors_iterator(files), block.column_pieces(prefix, lo, hi, 0, hi - lo),
                                      replicated)
        assert set(replicated) <= loaded  # the router (and shared gate) are read whole on every rank
        yield block


def test_ranks_shares_sum_to_the_transformers_block_at_every_width(moe_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    style, path = moe_model
    config = AutoConfig.from_pretrained(path)
    shape = model_shape_of(config)
    assert (shape.num_experts, shape.intermediate_size) == (5, 36)
    assert shape.shared_columns_per_unit == (2 if style == "qwen2_moe" else 0)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].mlp
    x = torch.randn(1, 9, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0]
        even = [[s.mlp_columns for s in TPLayout.even(shape, tp).shards] for tp in (1, 2, 3, 4)]
        for spans in even + [[(0, 20), (20, 21), (21, 36)]]:  # and widths as unequal as a regroup could leave
            total = sum(block.partial(x[0]) for block in _shares(config, shape, spans, path))
            torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
        empty = next(_shares(config, shape, [(0, 36)], path)).partial(x[0, :0])
        assert empty.shape == (0, config.hidden_size)


def _config(**fields):
    base = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, num_hidden_layers=2, vocab_size=512)
    return types.SimpleNamespace(**base, **fields)


def test_moe_shapes_from_configs_and_the_layouts_ft_refuses():
    mixtral = model_shape_of(_config(model_type="mixtral", num_local_experts=8, intermediate_size=112))
    assert (mixtral.num_experts, mixtral.intermediate_size, mixtral.ffns_per_column) == (8, 112, 8)
    qwen = _config(model_type="qwen2_moe", num_experts=60, moe_intermediate_size=32, intermediate_size=999,
                   shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[])
    shape = model_shape_of(qwen)
    assert (shape.num_experts, shape.intermediate_size, shape.shared_columns_per_unit) == (60, 32, 4)
    assert shape.ffns_per_column == 64 and model_shape_of(_config(model_type="llama", intermediate_size=9)) \
        .ffns_per_column == 1
    with pytest.raises(ValueError, match="multiple of an expert"):
        model_shape_of(types.SimpleNamespace(**{**vars(qwen), "shared_expert_intermediate_size": 100}))
    with pytest.raises(ValueError, match="every layer is sparse"):
        model_shape_of(types.SimpleNamespace(**{**vars(qwen), "mlp_only_layers": [0]}))


def test_launch_check_names_the_unsupported_moe_layout(tmp_path):
    from sglang_ft.launch_checks import check_ft_launch

    make_tiny_model.main([str(tmp_path), "--moe", "--architecture", "qwen2"])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_sparse_step": 2}))
    args = types.SimpleNamespace(model_path=str(tmp_path), trust_remote_code=False, tp_size=2, pp_size=1, dp_size=1)
    assert any("every layer is sparse" in p for p in check_ft_launch(args))


MOE_SHAPES = st.builds(
    lambda kv, g, experts, shared, cols: ModelShape(kv * g, kv, 8, 64, cols, 256, 2, 2, experts, shared),
    st.integers(2, 8), st.sampled_from([1, 2, 4]), st.integers(2, 16), st.integers(0, 4), st.integers(8, 64))


@settings(max_examples=60, deadline=None)
@given(MOE_SHAPES, st.data())
def test_planner_on_moe_shapes_reloads_only_the_dead_workers_share(shape, data):
    tp = data.draw(st.integers(2, shape.num_key_value_heads))
    dead = data.draw(st.integers(0, tp - 1))
    layout = TPLayout.even(shape, tp)
    plan = plan_migration(shape, dict(enumerate(layout.shards)), [w for w in range(tp) if w != dead])
    plan.layout.validate()
    unit = bytes_per_unit(shape)
    # a unit of MLP columns carries that column of every expert and its shared-expert columns: 3 matrices each
    assert unit["mlp_columns"] == 2 * 3 * 64 * 2 * (shape.num_experts + shape.shared_columns_per_unit)
    share = sum((getattr(layout.shards[dead], d)[1] - getattr(layout.shards[dead], d)[0]) * unit[d] for d in unit)
    assert plan.bytes_reloaded == share  # exactly the dead worker's experts' columns, nothing a survivor holds
    totals = {"kv_heads": shape.num_key_value_heads, "mlp_columns": shape.intermediate_size, "vocab_rows": 256}
    assert plan.bytes_kept + plan.bytes_p2p + plan.bytes_reloaded == sum(totals[d] * unit[d] for d in totals)
