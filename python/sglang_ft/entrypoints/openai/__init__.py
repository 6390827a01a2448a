"""Adapters of `sglang.srt.entrypoints.openai`: input checks on the OpenAI-compatible routes."""
