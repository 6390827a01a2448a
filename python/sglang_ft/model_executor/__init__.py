"""Adapters of `sglang.srt.model_executor`."""
