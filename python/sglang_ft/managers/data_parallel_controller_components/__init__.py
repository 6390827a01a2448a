"""sglang-ft inside SGLang's data-parallel controller: per-replica outboxes that never block on a replica without
a rank 0."""
