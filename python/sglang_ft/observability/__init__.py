"""Adapters of SGLang's observability (its Prometheus metrics) for a group whose ranks and KV pool change."""
