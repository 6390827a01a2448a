"""sglang-ft: the SGLang side of fault-tolerant tensor parallelism.

Folders mirror `sglang/srt/` so an SGLang engineer knows where to look:
- platforms/: the `torch_cpu` platform plugin (serve real SGLang on a machine with no GPU);
- plugin.py: the `ft` general plugin entry point (registers every hook, listed in hooks.py);
- server_args.py: the `--ft` / `--ft-*` flags and their carrier into SGLang's subprocesses;
- models/: the elastic, unequal-width Llama-family model;
- model_loader/: lazy per-rank slice reading of safetensors weights;
- tools/: make_tiny_model.
"""

__version__ = "0.1.0"
