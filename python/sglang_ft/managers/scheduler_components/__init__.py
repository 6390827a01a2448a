"""sglang-ft inside each TP scheduler process: output rewind after a new rank 0, moved requests from a lost replica
(and their KV), the worker load shown in `/ft/status`."""
