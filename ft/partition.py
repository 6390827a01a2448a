"""Unequal-width tensor-parallel layouts: which heads, MLP columns and vocabulary rows each rank holds.

A layout is data (a `TPLayout`), computed once and handed to the model; layers never recompute sizes. Heads are
split by whole GQA groups (one KV head with its query heads), so 8 query heads and 4 KV heads over 3 ranks give
4+2+2 query heads and 2+1+1 KV heads. Every dimension is split into contiguous spans whose sizes differ by at most
one unit. The elastic regroup reuses this to describe old and new assignments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

Span = tuple[int, int]  # [start, end) in units of the dimension it describes


def balanced_sizes(total: int, parts: int) -> list[int]:
    """`total` units over `parts` parts, the first `total % parts` parts one larger."""
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    if total < parts:
        raise ValueError(f"cannot split {total} units into {parts} non-empty parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def spans_from_sizes(sizes: list[int], start: int = 0) -> list[Span]:
    """Consecutive [start, end) spans of the given sizes."""
    spans, cursor = [], start
    for size in sizes:
        spans.append((cursor, cursor + size))
        cursor += size
    return spans


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that partitioning needs.

    For a mixture-of-experts model `intermediate_size` is one expert's FFN width: a unit of `mlp_columns` is that
    column of every routed expert, plus `shared_columns_per_unit` columns of a shared expert (Qwen2-MoE's is a
    whole multiple of an expert's width), so every rank holds the same span of every expert.
    """

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    dtype_bytes: int = 4
    num_experts: int = 0  # routed experts per MoE layer; 0 for a dense MLP
    shared_columns_per_unit: int = 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (one GQA group)."""
        return self.num_attention_heads // self.num_key_value_heads

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts < 0 or self.shared_columns_per_unit < 0:
            raise ValueError("num_experts and shared_columns_per_unit cannot be negative")
        if self.shared_columns_per_unit and not self.num_experts:
            raise ValueError("a shared expert needs routed experts (num_experts > 0)")

    @property
    def ffns_per_column(self) -> int:
        """Dense FFN columns one unit of `mlp_columns` stands for: 1, or one per expert plus the shared ones."""
        return self.num_experts + self.shared_columns_per_unit if self.num_experts else 1


@dataclass(frozen=True)
class RankShard:
    """One rank's contiguous share of each partitioned dimension."""

    kv_heads: Span
    mlp_columns: Span
    vocab_rows: Span

    def q_heads(self, group_size: int) -> Span:
        return (self.kv_heads[0] * group_size, self.kv_heads[1] * group_size)

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def num_mlp_columns(self) -> int:
        return self.mlp_columns[1] - self.mlp_columns[0]

    @property
    def num_vocab_rows(self) -> int:
        return self.vocab_rows[1] - self.vocab_rows[0]


@dataclass(frozen=True)
class TPLayout:
    """A whole TP group's assignment: `shards[r]` is what TP rank r holds.

    Under hybrid attention (`ft.remainder_routing`) the shards' KV-head spans tile only the evenly divisible heads
    and `remainder` is the span of KV heads every rank holds the weights of and runs as data-parallel attention,
    each request's on its owner; it is empty otherwise.
    """

    shape: ModelShape
    shards: tuple[RankShard, ...]
    remainder: Span = (0, 0)

    @property
    def num_remainder_kv_heads(self) -> int:
        return self.remainder[1] - self.remainder[0]

    @property
    def tp_size(self) -> int:
        return len(self.shards)

    def shard(self, rank: int) -> RankShard:
        return self.shards[rank]

    @classmethod
    def even(cls, shape: ModelShape, tp_size: int, hybrid: bool = False) -> "TPLayout":
        """The balanced layout: rank r gets the r-th span of every dimension. With `hybrid`, every rank gets
        `H // tp_size` KV heads and the `H % tp_size` last ones are the data-parallel remainder."""
        check_tp_size(shape, tp_size)
        heads = shape.num_key_value_heads
        tp_heads = heads - heads % tp_size if hybrid else heads
        kv = spans_from_sizes(balanced_sizes(tp_heads, tp_size))
        mlp = spans_from_sizes(balanced_sizes(shape.intermediate_size, tp_size))
        vocab = spans_from_sizes(balanced_sizes(shape.vocab_size, tp_size))
        remainder = (tp_heads, heads) if tp_heads < heads else (0, 0)
        layout = cls(shape, tuple(RankShard(k, m, v) for k, m, v in zip(kv, mlp, vocab)), remainder)
        layout.validate()
        return layout

    def validate(self) -> None:
        """Raise ValueError unless every dimension is covered exactly once by non-empty spans."""
        heads = self.shape.num_key_value_heads
        tp_heads = self.remainder[0] if self.num_remainder_kv_heads else heads
        if self.remainder != (0, 0) and not 0 < self.remainder[0] < self.remainder[1] == heads:
            raise ValueError(f"remainder heads {self.remainder} are not the last ones of the {heads} KV heads")
        dims = {
            "kv_heads": tp_heads,
            "mlp_columns": self.shape.intermediate_size,
            "vocab_rows": self.shape.vocab_size,
        }
        for dim, total in dims.items():
            spans = sorted(getattr(s, dim) for s in self.shards)
            cursor = 0
            for start, end in spans:
                if start != cursor or end <= start:
                    raise ValueError(f"{dim} spans {spans} do not tile [0, {total}) with non-empty parts")
                cursor = end
            if cursor != total:
                raise ValueError(f"{dim} spans {spans} do not cover [0, {total})")

    def to_json(self) -> str:
        return json.dumps({"shape": asdict(self.shape), "shards": [asdict(s) for s in self.shards],
                           "remainder": self.remainder})

    @classmethod
    def from_json(cls, text: str) -> "TPLayout":
        data = json.loads(text)
        shards = tuple(RankShard(**{k: tuple(v) for k, v in s.items()}) for s in data["shards"])
        layout = cls(ModelShape(**data["shape"]), shards, tuple(data.get("remainder", (0, 0))))
        layout.validate()
        return layout


def check_tp_size(shape: ModelShape, tp_size: int) -> None:
    """Elastic TP gives each rank whole GQA groups, so it needs 1 <= tp_size <= num_key_value_heads."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be at least 1, got {tp_size}")
    if tp_size > shape.num_key_value_heads:
        raise ValueError(
            f"--tp-size {tp_size} exceeds the model's {shape.num_key_value_heads} KV heads; elastic TP gives every "
            "rank whole GQA groups and does not replicate KV heads, so use --tp-size <= num_key_value_heads"
        )
