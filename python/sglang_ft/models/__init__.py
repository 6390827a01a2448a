"""Models served under `--ft`: the elastic Llama family."""
