"""The remainder heads (the `H % W` KV heads that do not divide over W workers): their KV pool and attention, and
where each token's remainder KV is placed (hybrid attention per request, cyclic placement per token)."""
