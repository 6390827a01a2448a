"""The elastic Llama-family model (Llama, Mistral, Qwen2, and the MoE Mixtral and Qwen2-MoE) served under `--ft`,
on SGLang's layers and attention.

Each TP rank holds whole GQA groups of heads, a span of MLP columns and a span of the vocabulary, as given by the
layout in `sglang_ft.distributed_state`; spans may differ in width (4 KV heads over 3 ranks = 2+1+1). Rank-local
projections are SGLang `ReplicatedLinear` layers of the local size; row-parallel outputs are all-reduced here.
Attention is SGLang's RadixAttention, so the radix cache, the KV pool and every attention backend work as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from torch import nn

from ft.partition import RankShard, TPLayout
from ft.planner import DIMENSIONS
from sglang_ft.distributed_state import current_layout, layout_rank
from sglang_ft.layers.attention.remainder_attention import (
    CyclicBatch,
    RemainderBatch,
    merge_partials,
    remainder_attention,
)
from sglang_ft.layers.elastic_parallel import ElasticLMHead, ElasticVocabEmbedding, all_reduce
from sglang_ft.models.elastic_mlp import ElasticMLP
from sglang_ft.models.elastic_moe import MOE_ARCHITECTURES, ElasticSparseMoe
from sglang_ft.models.weight_pieces import Piece, fill_from_checkpoint

logger = logging.getLogger(__name__)


def _rope_settings(config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers' v5 `rope_parameters` or the older fields."""
    params = getattr(config, "rope_parameters", None)
    if params is not None:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return params.get("rope_theta", 10000.0), scaling
    return getattr(config, "rope_theta", 10000.0), getattr(config, "rope_scaling", None)


class ElasticAttention(nn.Module):
    """Self-attention over this rank's GQA groups; the output projection is summed over ranks."""

    def __init__(self, config, layout: TPLayout, shard: RankShard, layer_id: int, prefix: str):
        super().__init__()
        shape = layout.shape
        self.head_dim = shape.head_dim
        self.num_kv_heads = shard.num_kv_heads
        self.num_heads = shard.num_kv_heads * shape.group_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or config.model_type in ("qwen2", "qwen2_moe")
        self.qkv_proj = ReplicatedLinear(
            shape.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = ReplicatedLinear(self.q_size, shape.hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        # A row-parallel bias is added once, after the sum over ranks.
        self.o_bias = nn.Parameter(torch.zeros(shape.hidden_size), requires_grad=False) if attention_bias else None
        rope_theta, rope_scaling = _rope_settings(config)
        self.rotary_emb = get_rope(
            self.head_dim,
            rotary_dim=self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            base=rope_theta,
            rope_scaling=rope_scaling,
            is_neox_style=True,
        )
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            prefix=f"{prefix}.attn",
        )
        # The remainder heads (hybrid attention, cyclic placement): every rank holds their weights; it computes them
        # for the requests it owns (hybrid) or over the rows it holds (cyclic).
        self.group_size = shape.group_size
        self.remainder_kv_heads = layout.num_remainder_kv_heads
        self.rem_q_size = self.remainder_kv_heads * shape.group_size * self.head_dim
        self.rem_kv_size = self.remainder_kv_heads * self.head_dim
        self.rem_qkv_proj = self.rem_o_proj = None
        if self.remainder_kv_heads:
            self.rem_qkv_proj = ReplicatedLinear(shape.hidden_size, self.rem_q_size + 2 * self.rem_kv_size,
                                                 bias=qkv_bias, prefix=f"{prefix}.rem_qkv_proj")
            self.rem_o_proj = ReplicatedLinear(self.rem_q_size, shape.hidden_size, bias=False,
                                               prefix=f"{prefix}.rem_o_proj")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v, forward_batch))
        if self.rem_qkv_proj is not None:
            self._add_remainder_heads(out, positions, hidden, forward_batch.ft_remainder)
        out = all_reduce(out)
        return out if self.o_bias is None else out + self.o_bias

    def _add_remainder_heads(self, out, positions, hidden, batch: RemainderBatch | CyclicBatch) -> None:
        """Add the remainder heads' output of the requests this rank owns (data-parallel attention): the other
        rows stay as they are, and the all-reduce adds each request's remainder heads exactly once."""
        if isinstance(batch, CyclicBatch):
            self._add_cyclic_remainder_heads(out, positions, hidden, batch)
            return
        if not batch.spans:
            return
        rows = batch.rows
        qkv, _ = self.rem_qkv_proj(hidden[rows])
        q, k, v = qkv.split([self.rem_q_size, self.rem_kv_size, self.rem_kv_size], dim=-1)
        q, k = self.rotary_emb(positions[rows], q, k)
        heads, hd = self.remainder_kv_heads, self.head_dim
        layer = self.attn.layer_id
        k, v = k.reshape(-1, heads, hd), v.reshape(-1, heads, hd)
        batch.pool.write(layer, batch.new_slots, k, v)
        attended = remainder_attention(q.reshape(-1, heads * self.group_size, hd), batch.pool, layer, batch.spans,
                                       self.group_size, self.attn.scaling)
        projected, _ = self.rem_o_proj(attended.reshape(len(rows), -1))
        out.index_add_(0, rows, projected)

    def _add_cyclic_remainder_heads(self, out, positions, hidden, batch: CyclicBatch) -> None:
        """Cyclic placement: every rank projects the remainder heads of every token (their weights are
        replicated), keeps the K and V rows it holds, attends over them, and the partials are merged across
        ranks; each token's output projection is then added on one rank, before the layer's all-reduce."""
        qkv, _ = self.rem_qkv_proj(hidden)
        q, k, v = qkv.split([self.rem_q_size, self.rem_kv_size, self.rem_kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        heads, hd = self.remainder_kv_heads, self.head_dim
        layer = self.attn.layer_id
        rows = batch.written_rows
        k, v = k[rows].reshape(-1, heads, hd), v[rows].reshape(-1, heads, hd)
        batch.pool.write(layer, batch.written_slots, k, v)
        partial, lse = batch.partial_attention(q.reshape(len(q), heads * self.group_size, hd), layer,
                                               self.group_size, self.attn.scaling)
        attended = merge_partials(partial, lse, batch.rank, batch.size, batch.all_reduce).to(hidden.dtype)
        mine = batch.projected_rows
        projected, _ = self.rem_o_proj(attended[mine].reshape(len(mine), self.rem_q_size))
        out.index_add_(0, mine, projected)


def make_mlp(config, shard: RankShard, shape, prefix: str) -> tuple[nn.Module, str]:
    """The layer's feed-forward block and its checkpoint prefix: a dense MLP or a mixture of experts."""
    if not shape.num_experts:
        return ElasticMLP(config.hidden_size, shard.num_mlp_columns, f"{prefix}.mlp"), f"{prefix}.mlp"
    moe_prefix = f"{prefix}.{MOE_ARCHITECTURES[config.architectures[0]]}"
    return ElasticSparseMoe(config, shard.num_mlp_columns, shape.shared_columns_per_unit, moe_prefix), moe_prefix


class ElasticDecoderLayer(nn.Module):
    def __init__(self, config, layout: TPLayout, shard: RankShard, layer_id: int, prefix: str):
        super().__init__()
        self.self_attn = ElasticAttention(config, layout, shard, layer_id, f"{prefix}.self_attn")
        self.mlp, self.mlp_prefix = make_mlp(config, shard, layout.shape, prefix)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden, forward_batch, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class ElasticLlamaModel(nn.Module):
    def __init__(self, config, layout: TPLayout, shard: RankShard):
        super().__init__()
        self.embed_tokens = ElasticVocabEmbedding(shard.vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(
            ElasticDecoderLayer(config, layout, shard, i, f"model.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, forward_batch, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class ElasticLlamaForCausalLM(nn.Module):
    """Drop-in for SGLang's LlamaForCausalLM under `--ft`, partitioned by the process's TPLayout."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError("--ft does not support quantized checkpoints yet")
        self.config = config
        self.layout = current_layout(config)
        self.tp_rank = layout_rank()
        self.shard = self.layout.shard(self.tp_rank)
        self.model = ElasticLlamaModel(config, self.layout, self.shard)
        self.lm_head = ElasticLMHead(self.shard.vocab_rows, config.hidden_size, self._vocab_spans())
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_processor = LogitsProcessor(config, skip_all_gather=True)
        self.remainder = None  # under hybrid attention, the scheduler's RemainderPlacement (remainder_placement.py)
        logger.info(
            "sglang-ft: TP rank %d of %d holds KV heads %s, MLP columns %s, vocabulary rows %s",
            self.tp_rank,
            self.layout.tp_size,
            self.shard.kv_heads,
            self.shard.mlp_columns,
            self.shard.vocab_rows,
        )

    def _vocab_spans(self):
        return [s.vocab_rows for s in self.layout.shards]

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding=False, **_):
        if self.layout.num_remainder_kv_heads:
            if self.remainder is None:
                raise RuntimeError("sglang-ft: hybrid attention needs the scheduler's remainder placement")
            forward_batch.ft_remainder = self.remainder.batch(forward_batch)
        hidden = self.model(input_ids, positions, forward_batch, input_embeds)
        if get_embedding:
            raise ValueError("--ft serves generation models only")
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def unit_pieces(self, dim: str, start: int, end: int) -> list[Piece]:
        """Where global units [start, end) of `dim` live: checkpoint tensor slices and the views they fill here.

        The order is canonical (layer by layer, then a fixed order of tensors), so two ranks listing the same
        units can stream them to each other as one flat buffer.
        """
        span = getattr(self.shard, dim)
        if not span[0] <= start <= end <= span[1]:
            raise ValueError(f"units [{start}, {end}) of {dim} are not in this rank's span {span}")
        a, b = start - span[0], end - span[0]
        if dim == "vocab_rows":
            pieces = [Piece("model.embed_tokens.weight", 0, start, end, self.model.embed_tokens.weight[a:b])]
            if not self.config.tie_word_embeddings:
                pieces.append(Piece("lm_head.weight", 0, start, end, self.lm_head.weight[a:b]))
            return pieces
        pieces = []
        hd, g = self.layout.shape.head_dim, self.layout.shape.group_size
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}"
            if dim == "kv_heads":
                attn = layer.self_attn
                pieces += head_pieces(f"{prefix}.self_attn", attn.qkv_proj, attn.o_proj, attn.q_size, attn.kv_size,
                                      start, end, a, g * hd, hd)
            else:
                pieces += layer.mlp.column_pieces(layer.mlp_prefix, start, end, a, b)
        return pieces

    def replicated_params(self) -> dict[str, torch.Tensor]:
        """Checkpoint name -> parameter, for the tensors every rank holds whole (norms, row-parallel biases)."""
        params = {name: p for name, p in self.named_parameters() if "norm" in name}
        for i, layer in enumerate(self.model.layers):
            if layer.self_attn.o_bias is not None:
                params[f"model.layers.{i}.self_attn.o_proj.bias"] = layer.self_attn.o_bias
            params.update(layer.mlp.replicated_params(layer.mlp_prefix))
        return params

    def remainder_pieces(self, start: int | None = None, end: int | None = None) -> list[Piece]:
        """Checkpoint slices of remainder heads [start, end) (hybrid attention; all of them by default), which
        every rank holds whole."""
        first, last = self.layout.remainder
        start, end = first if start is None else start, last if end is None else end
        if not first <= start <= end <= last:
            raise ValueError(f"heads [{start}, {end}) are not among the remainder heads {self.layout.remainder}")
        shape = self.layout.shape
        pieces = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if attn.rem_qkv_proj is not None and start < end:
                pieces += head_pieces(f"model.layers.{i}.self_attn", attn.rem_qkv_proj, attn.rem_o_proj,
                                      attn.rem_q_size, attn.rem_kv_size, start, end, start - first,
                                      shape.group_size * shape.head_dim, shape.head_dim)
        return pieces

    def head_pieces_held(self, start: int, end: int) -> list[Piece] | None:
        """Slices of KV heads [start, end) wherever this rank holds all of them (its TP span or the remainder)."""
        (tp_first, tp_last), (first, last) = self.shard.kv_heads, self.layout.remainder
        if tp_first <= start and end <= tp_last:
            return self.unit_pieces("kv_heads", start, end)
        if first < last and first <= start and end <= last:
            return self.remainder_pieces(start, end)
        return None

    def all_pieces(self) -> list[Piece]:
        return [p for dim in DIMENSIONS for p in self.unit_pieces(dim, *getattr(self.shard, dim))] + \
            self.remainder_pieces()

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Fill this rank's share from the checkpoint, reading only its slices when the tensors are lazy."""
        pieces, replicated = self.all_pieces(), self.replicated_params()
        loaded = fill_from_checkpoint(weights, pieces, replicated)
        expected = {p.name for p in pieces} | set(replicated)
        if expected - loaded:
            raise ValueError(f"checkpoint is missing {sorted(expected - loaded)}")
        return loaded


def head_pieces(prefix: str, qkv_proj, o_proj, q_size: int, kv_size: int, start: int, end: int, a: int,
                q_rows: int, kv_rows: int) -> list[Piece]:
    """Checkpoint slices of global KV heads [start, end) held from local head `a` on in a fused qkv projection
    (q, then k, then v rows) and an output projection (columns); `q_rows` and `kv_rows` per KV head."""
    n = end - start
    pieces = []
    params = [(qkv_proj.weight, "weight")] + ([(qkv_proj.bias, "bias")] if qkv_proj.bias is not None else [])
    for param, suffix in params:
        pieces += [
            Piece(f"{prefix}.q_proj.{suffix}", 0, start * q_rows, end * q_rows, param[a * q_rows : (a + n) * q_rows]),
            Piece(f"{prefix}.k_proj.{suffix}", 0, start * kv_rows, end * kv_rows,
                  param[q_size + a * kv_rows : q_size + (a + n) * kv_rows]),
            Piece(f"{prefix}.v_proj.{suffix}", 0, start * kv_rows, end * kv_rows,
                  param[q_size + kv_size + a * kv_rows : q_size + kv_size + (a + n) * kv_rows]),
        ]
    pieces.append(Piece(f"{prefix}.o_proj.weight", 1, start * q_rows, end * q_rows,
                        o_proj.weight[:, a * q_rows : (a + n) * q_rows]))
    return pieces


EntryClass = [ElasticLlamaForCausalLM]
