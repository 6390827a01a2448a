"""The elastic dense MLP: SwiGLU over a span of intermediate columns, the block of a dense model and an MoE model's
shared expert."""

from __future__ import annotations

import torch
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.linear import ReplicatedLinear
from torch import nn

from sglang_ft.layers.elastic_parallel import all_reduce
from sglang_ft.models.weight_pieces import Piece


class ElasticMLP(nn.Module):
    """SwiGLU over this rank's span of intermediate columns; the down projection is summed over ranks."""

    def __init__(self, hidden_size: int, columns: int, prefix: str):
        super().__init__()
        self.columns = columns
        self.gate_up_proj = ReplicatedLinear(hidden_size, 2 * columns, bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = ReplicatedLinear(columns, hidden_size, bias=False, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (the sum over ranks is the whole output)."""
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out

    def column_pieces(self, prefix: str, start: int, end: int, a: int, b: int) -> list[Piece]:
        """Checkpoint slices for global columns [start, end), local [a, b)."""
        gate_up, cols = self.gate_up_proj.weight, self.columns
        return [Piece(f"{prefix}.gate_proj.weight", 0, start, end, gate_up[a:b]),
                Piece(f"{prefix}.up_proj.weight", 0, start, end, gate_up[cols + a : cols + b]),
                Piece(f"{prefix}.down_proj.weight", 1, start, end, self.down_proj.weight[:, a:b])]

    def replicated_params(self, prefix: str) -> dict[str, torch.Tensor]:
        return {}
