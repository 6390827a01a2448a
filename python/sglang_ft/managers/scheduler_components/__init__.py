"""Adapters of `sglang.srt.managers.scheduler_components`: the scheduler's request intake, output and channels."""
