"""sglang-ft inside the tokenizer manager: the journal of requests sent and not finished (re-sent to a new rank 0,
moved off a lost replica) and the router that picks each request's data-parallel replica."""
