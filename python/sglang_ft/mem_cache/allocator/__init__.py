"""Adapters of `sglang.srt.mem_cache.allocator`: freed token slots."""
