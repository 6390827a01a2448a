"""sglang-ft: the SGLang side of fault-tolerant tensor parallelism.

Folders mirror `sglang/srt/` so an SGLang engineer knows where to look:
- platforms/: the `torch_cpu` platform plugin (serve real SGLang on a machine with no GPU);
- plugin.py, hooks.py: the `ft` general plugin entry point and the table of every hook on SGLang; each hook's
  handler lives in the adapter of the SGLang module it extends, at the same path (`sglang.srt.managers.scheduler`
  -> `managers/scheduler.py`, `configs/`, `utils/`, `mem_cache/allocator/` ...);
- sglang_surface.py: every other touch of an SGLang internal, by name, checked against the pinned SGLang;
- server_args.py, launch_checks.py: the `--ft` / `--ft-*` flags, their carrier into subprocesses, launch errors;
- entrypoints/: the FT runtime beside SGLang's processes and the `/ft/*` HTTP routes;
- managers/: the FT controller process, the per-scheduler FT worker, and sglang-ft's parts of SGLang's processes,
  by process (scheduler_components/, tokenizer_manager_components/, data_parallel_controller_components/), with the
  messages between them (io_struct.py);
- elastic_tp/: the in-place regroup of a scheduler to a new TP group (groups, requests, reshard, KV restore, joiner);
- distributed/: failed and interrupted collectives, peer-to-peer transfers, agreement among ranks;
- models/, layers/: the elastic, unequal-width Llama-family model; layers/attention/: the remainder heads;
- mem_cache/: the KV backup stream;
- model_loader/: lazy per-rank slice reading of safetensors weights;
- tools/: make_tiny_model, launching servers, the transformers reference; demo.py: `make demo`.
"""

__version__ = "0.1.0"
