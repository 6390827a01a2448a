"""HuggingFace Llama-family checkpoint names, parsed into what the elastic model needs to place them."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_KIND = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "gate", "up": "up", "down": "down"}


@dataclass(frozen=True)
class WeightRef:
    """A checkpoint tensor: its kind (q, k, v, o, gate, up, down, embed, lm_head, norm), layer and suffix."""

    kind: str
    layer: int | None
    suffix: str
    param_name: str  # where it lands when it is not stacked (o, down, norms, embeddings)


def parse_weight_name(name: str) -> WeightRef | None:
    """The WeightRef of a checkpoint name, or None for tensors the model does not use (e.g. rotary caches)."""
    if name == "model.embed_tokens.weight":
        return WeightRef("embed", None, "weight", name)
    if name == "lm_head.weight":
        return WeightRef("lm_head", None, "weight", name)
    if name == "model.norm.weight":
        return WeightRef("norm", None, "weight", name)
    match = _NORM.match(name)
    if match:
        return WeightRef("norm", int(match.group(1)), "weight", name)
    match = _LAYER.match(name)
    if not match or match.group(3) not in _KIND:
        return None
    layer, block, proj, suffix = int(match.group(1)), match.group(2), match.group(3), match.group(4)
    if proj == "o" and suffix == "bias":
        return WeightRef("o_bias", layer, suffix, f"model.layers.{layer}.self_attn.o_bias")
    return WeightRef(_KIND[proj], layer, suffix, f"model.layers.{layer}.{block}.{proj}_proj.{suffix}")
