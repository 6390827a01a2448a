"""Layers for unequal-width tensor parallelism, built on SGLang's linear layers and communication ops."""
