"""The elastic mixture-of-experts block (Mixtral, Qwen2-MoE) on SGLang's torch-native MoE path.

Every rank holds the same span of FFN columns of every expert (and the matching columns of a shared expert), so
an MoE layer partitions with unequal widths exactly like a dense MLP: the router is replicated, every rank routes
each token to the same top-k experts, computes its columns' share of their outputs, and one all-reduce sums the
shares. Experts are never split across ranks by expert index (that would be expert parallelism, whose regroup
moves whole experts); the planner sees one unit of `mlp_columns` as that column of every expert.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
from sglang.srt.layers.moe.topk import StandardTopKOutput, fused_topk_torch_native
from torch import nn

from sglang_ft.layers.elastic_parallel import all_reduce
from sglang_ft.models.elastic_mlp import ElasticMLP
from sglang_ft.models.weight_pieces import Piece

MOE_ARCHITECTURES = {"MixtralForCausalLM": "block_sparse_moe", "Qwen2MoeForCausalLM": "mlp"}  # checkpoint prefix


def expert_count(config) -> int:
    """Routed experts per layer (0 for a dense model), under either config's name for it."""
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


class ElasticSparseMoe(nn.Module):
    """Top-k routed experts (and an optional gated shared expert) over this rank's span of each expert's columns.

    `w13_weight` [experts, 2 * columns, hidden] and `w2_weight` [experts, hidden, columns] are the layout SGLang's
    `moe_forward_native` computes with; `shared_expert` (a dense elastic MLP) holds `shared_per_unit` shared-expert
    columns per routed column.
    """

    def __init__(self, config, columns: int, shared_per_unit: int, prefix: str):
        super().__init__()
        hidden = config.hidden_size
        self.num_experts = expert_count(config)
        self.columns = columns
        self.top_k = config.num_experts_per_tok
        # Mixtral always renormalises the top-k weights; Qwen2-MoE only with norm_topk_prob.
        self.renormalize = bool(getattr(config, "norm_topk_prob", True))
        self.gate = ReplicatedLinear(hidden, self.num_experts, bias=False, prefix=f"{prefix}.gate")
        self.w13_weight = nn.Parameter(torch.empty(self.num_experts, 2 * columns, hidden), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(self.num_experts, hidden, columns), requires_grad=False)
        self.runner_config = MoeRunnerConfig(num_experts=self.num_experts, top_k=self.top_k, activation="silu")
        self.shared_columns = columns * shared_per_unit
        if self.shared_columns:
            self.shared_expert = ElasticMLP(hidden, self.shared_columns, f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False, prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the block's output (the sum over ranks is the whole output)."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        logits, _ = self.gate(x)
        weights, ids = fused_topk_torch_native(x, logits, self.top_k, self.renormalize)
        out = moe_forward_native(self, x, StandardTopKOutput(weights, ids, logits), self.runner_config)
        if self.shared_columns:
            out = out + torch.sigmoid(self.shared_expert_gate(x)[0]) * self.shared_expert.partial(x)
        return out.to(x.dtype)

    def column_pieces(self, prefix: str, start: int, end: int, a: int, b: int) -> list[Piece]:
        """Checkpoint slices for global columns [start, end) (local [a, b)) of every expert, then the shared
        expert's matching columns."""
        names = self._expert_names(prefix)
        pieces, cols = [], self.columns
        for e in range(self.num_experts):
            gate, up, down = names(e)
            pieces += [Piece(gate, 0, start, end, self.w13_weight[e, a:b]),
                       Piece(up, 0, start, end, self.w13_weight[e, cols + a : cols + b]),
                       Piece(down, 1, start, end, self.w2_weight[e, :, a:b])]
        if self.shared_columns:
            m = self.shared_columns // cols
            pieces += self.shared_expert.column_pieces(f"{prefix}.shared_expert", start * m, end * m, a * m, b * m)
        return pieces

    def replicated_params(self, prefix: str) -> dict[str, torch.Tensor]:
        """The router (and the shared expert's gate): every rank holds them whole."""
        params = {f"{prefix}.gate.weight": self.gate.weight}
        if self.shared_columns:
            params[f"{prefix}.shared_expert_gate.weight"] = self.shared_expert_gate.weight
        return params

    def _expert_names(self, prefix: str):
        if prefix.endswith("block_sparse_moe"):  # Mixtral: w1 gate, w3 up, w2 down
            return lambda e: tuple(f"{prefix}.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
        return lambda e: tuple(f"{prefix}.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))
