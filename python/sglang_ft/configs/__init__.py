"""Adapters of `sglang.srt.configs`: the model's per-rank head counts and sizes under the elastic layout."""
