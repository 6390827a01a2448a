"""Adapters of `sglang.srt.utils`: the launcher's watchdog."""
