"""KV-pool changes for elastic TP: reshaping a pool's head dimension in place."""
