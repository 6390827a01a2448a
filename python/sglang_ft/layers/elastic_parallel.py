"""Vocabulary-parallel embedding and LM head with unequal shards, and the TP reductions they need.

SGLang's VocabParallelEmbedding / ParallelLMHead split the vocabulary evenly (padded); these take their span from
the layout instead. The LM head hands SGLang's LogitsProcessor full logits through the `quant_method.apply` hook,
gathering unequal shards by padding to the widest one.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from ft.partition import Span


def tp_world() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_size


class CollectiveClock:
    """Seconds this rank spent inside TP collectives since `reset()`: with unequal shards, the ranks with less work
    wait there for the widest one, so a step's time minus this is the rank's own work (`/ft/status`). Host time:
    exact for gloo on CPU, where collectives block; CUDA collectives return at launch, so it is not kept there."""

    def __init__(self):
        self.seconds = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self, x: torch.Tensor):
        if x.is_cuda:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


COLLECTIVES = CollectiveClock()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group (identity at TP 1)."""
    if tp_world() == 1:
        return x
    from sglang.srt.distributed import tensor_model_parallel_all_reduce

    with COLLECTIVES.timing(x):
        return tensor_model_parallel_all_reduce(x)


def all_gather_spans(x: torch.Tensor, spans: list[Span]) -> torch.Tensor:
    """Assemble the full last dimension from every rank's shard; rank r holds columns spans[r] (any order)."""
    if len(spans) == 1:
        return x
    from sglang.srt.distributed import tensor_model_parallel_all_gather

    widest = max(end - start for start, end in spans)
    if x.shape[-1] < widest:
        x = F.pad(x, (0, widest - x.shape[-1]))
    with COLLECTIVES.timing(x):
        parts = tensor_model_parallel_all_gather(x.contiguous(), dim=-1).split(widest, dim=-1)
    full = x.new_empty(*x.shape[:-1], max(end for _, end in spans))
    for part, (start, end) in zip(parts, spans):
        full[..., start:end] = part[..., : end - start]
    return full


class ElasticVocabEmbedding(nn.Module):
    """Embedding rows [start, end) of the vocabulary on this rank; other ranks fill in the rest by all-reduce."""

    def __init__(self, rows: Span, embedding_dim: int):
        super().__init__()
        self.start, self.end = rows
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_world() == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.end)
        local_ids = torch.where(mine, input_ids - self.start, torch.zeros_like(input_ids))
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class UnequalVocabGather:
    """The `quant_method` of ElasticLMHead: local logits, then all ranks' unequal shards gathered in order.

    SGLang's LogitsProcessor calls `lm_head.quant_method.apply(lm_head, hidden, bias)` when a head has one; the
    processor is built with `skip_all_gather=True` because the gather happens here.
    """

    def __init__(self, spans: list[Span]):
        self.spans = spans

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing to repack: the weight is used as loaded."""

    def apply(self, layer: "ElasticLMHead", hidden_states: torch.Tensor, bias=None) -> torch.Tensor:
        logits = torch.matmul(hidden_states.to(layer.weight.dtype), layer.weight.t())
        if bias is not None:
            logits = logits + bias
        return all_gather_spans(logits, self.spans)


class ElasticLMHead(nn.Module):
    """LM head rows [start, end) of the vocabulary; produces the full vocabulary's logits."""

    def __init__(self, rows: Span, hidden_size: int, all_rows: list[Span]):
        super().__init__()
        self.start, self.end = rows
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden_size), requires_grad=False)
        self.quant_method = UnequalVocabGather(all_rows)
