"""Every hook sglang-ft puts on SGLang, in one table grouped by the SGLang module it extends: target -> (type, handler).

Each handler lives in the adapter module of the SGLang module it extends, at the same path under `sglang_ft/`
(`sglang.srt.managers.scheduler` -> `sglang_ft.managers.scheduler`). `PARAMETERS` pins each target's parameters in
SGLang 0.5.23: `test_hooks.py` resolves every target and compares its signature, so an upgrade that moves
or changes one fails with its name. Each handler leaves SGLang's behaviour untouched unless `--ft` is on, but the
`torch_cpu` platform's thread count (that platform only). SGLang
internals touched outside this table go through `sglang_surface.py`.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

from sglang_ft import server_args
from sglang_ft.configs import model_config, update_config
from sglang_ft.distributed import bootstrap
from sglang_ft.entrypoints import engine, http_server
from sglang_ft.entrypoints.openai import serving_tokenize
from sglang_ft.managers import data_parallel_controller, scheduler, tokenizer_manager
from sglang_ft.managers.scheduler_components import ipc_channels, output_sender, output_streamer, request_receiver
from sglang_ft.mem_cache import common, kv_cache_configurator
from sglang_ft.mem_cache.allocator import token
from sglang_ft.model_executor import model_runner
from sglang_ft.model_loader import utils as loader_utils
from sglang_ft.model_loader import weight_utils
from sglang_ft.utils import watchdog

BEFORE, AFTER, AROUND = HookType.BEFORE, HookType.AFTER, HookType.AROUND

_GROUPS = {  # SGLang module under sglang.srt -> (attribute, hook type, handler)
    # launcher: the --ft flags in SGLang's parser, a bad --ft launch refused before anything starts
    "server_args": [
        ("ServerArgs.add_cli_args", AFTER, server_args.after_add_cli_args),
        ("ServerArgs.from_cli_args", AROUND, server_args.around_from_cli_args),
    ],
    # launcher: the FT controller and the /ft/* routes start with the HTTP server
    "entrypoints.http_server": [("launch_server", BEFORE, http_server.before_launch_server)],
    # launcher: the scheduler launch arguments kept to restart dead workers
    "entrypoints.engine": [("Engine._launch_scheduler_processes", AROUND, engine.around_launch_scheduler_processes)],
    # launcher: a dead scheduler is the FT controller's to recover
    "utils.watchdog": [("SubprocessWatchdog._check_processes", AROUND, watchdog.around_watchdog_check)],
    # tokenizer manager: the request journal, input checks, a bounded drain on SIGTERM
    "managers.tokenizer_manager": [
        ("TokenizerManager._dispatch_to_scheduler", AROUND, tokenizer_manager.around_dispatch_to_scheduler),
        ("TokenizerManager._validate_one_request", BEFORE, tokenizer_manager.before_validate_one_request),
        ("SignalHandler.sigterm_handler", AFTER, tokenizer_manager.after_sigterm),
        ("TokenizerManager.is_ready", AROUND, tokenizer_manager.around_is_ready),
    ],
    # tokenizer manager: /v1/detokenize refuses ids outside the vocabulary
    "entrypoints.openai.serving_tokenize": [
        ("OpenAIServingDetokenize._validate_request", AFTER, serving_tokenize.after_validate_detokenize),
    ],
    # DP controller (--dp-size): never blocks on a replica without a rank 0
    "managers.data_parallel_controller": [
        ("DataParallelController.__init__", AFTER, data_parallel_controller.after_init),
        ("DataParallelController.update_active_ranks", AFTER, data_parallel_controller.after_update_active_ranks),
        ("DataParallelController.send_control_message", AROUND, data_parallel_controller.around_send_control_message),
    ],
    # scheduler: the FT worker attached at init runs the loop, checks orders, ledgers requests, watches every step
    "managers.scheduler": [
        ("Scheduler.__init__", AFTER, scheduler.after_init),
        ("_dispatch_event_loop_once", AROUND, scheduler.around_dispatch_event_loop),
        ("Scheduler.ingest_requests", BEFORE, scheduler.before_ingest_requests),
        ("Scheduler.process_input_requests", BEFORE, scheduler.before_process_input_requests),
        ("Scheduler.run_batch", AROUND, scheduler.around_run_batch),
        ("Scheduler.handle_generate_request", AFTER, scheduler.after_handle_generate_request),
        ("Scheduler._release_aborted_request", AFTER, scheduler.after_release_aborted_request),
    ],
    # scheduler: what rank 0 pulled, what finished, the "kill_unsent" fault, a restarted worker's channels
    "managers.scheduler_components.request_receiver": [
        ("SchedulerRequestReceiver._pull_raw_reqs", AROUND, request_receiver.around_pull_raw_reqs),
    ],
    "managers.scheduler_components.output_streamer": [
        ("SchedulerOutputStreamer.stream_output", AFTER, output_streamer.after_stream_output),
    ],
    "managers.scheduler_components.output_sender": [
        ("SenderWrapper.send_output", AROUND, output_sender.around_send_output),
    ],
    "managers.scheduler_components.ipc_channels": [
        ("SchedulerIpcChannels.create", AROUND, ipc_channels.around_create_ipc_channels),
    ],
    # scheduler: process groups whose failures raise in the survivor; on the torch_cpu platform (with or without
    # --ft) the rank's torch threads fitted to its cores
    "distributed.bootstrap": [
        ("_init_parallel_groups", AROUND, bootstrap.around_init_parallel_groups),
        ("_init_cpu_threads_env", AROUND, bootstrap.around_init_cpu_threads_env),
    ],
    # scheduler, KV cache: freed slots, the hybrid-attention owner at the first match, equal slots on every rank
    "mem_cache.allocator.token": [
        ("TokenToKVPoolAllocator.free", AFTER, token.after_free),
        ("TokenToKVPoolAllocator.clear", AFTER, token.after_clear),
    ],
    "mem_cache.common": [("match_kv_cache", AROUND, common.around_match_kv_cache)],
    "mem_cache.kv_cache_configurator": [
        ("KVCacheConfigurator._apply_token_constraints", AFTER, kv_cache_configurator.after_apply_token_constraints),
    ],
    # scheduler, model: the elastic model, its unequal head counts, true sizes, lazily read weight slices
    "model_loader.utils": [("get_model_architecture", AROUND, loader_utils.around_get_model_architecture)],
    # scheduler, model runner: attention backends for this rank's uneven heads, again after every regroup
    "model_executor.model_runner": [
        ("ModelRunner.init_attention_backends", AROUND, model_runner.around_init_attention_backends),
    ],
    "configs.model_config": [
        ("ModelConfig.get_num_kv_heads", AROUND, model_config.around_get_num_kv_heads),
        ("ModelConfig.get_num_attention_heads", AROUND, model_config.around_get_num_attention_heads),
    ],
    "configs.update_config": [
        ("adjust_config_with_unaligned_cpu_tp", AROUND, update_config.around_adjust_unaligned_cpu_tp),
    ],
    "model_loader.weight_utils": [
        ("safetensors_weights_iterator", AROUND, weight_utils.around_safetensors_iterator),
        ("buffered_multi_thread_safetensors_weights_iterator", AROUND, weight_utils.around_safetensors_iterator),
    ],
}

HOOKS: list[tuple[str, HookType, object]] = [(f"sglang.srt.{module}.{attr}", kind, handler)
                                             for module, entries in _GROUPS.items() for attr, kind, handler in entries]

# Each target's parameters in SGLang 0.5.23 (`inspect.signature`; bound classmethods without `cls`), as its handler
# takes them: test_hooks.py fails, naming the target, where the installed SGLang differs.
PARAMETERS = {
    "server_args.ServerArgs.add_cli_args": "parser",
    "server_args.ServerArgs.from_cli_args": "args",
    "entrypoints.http_server.launch_server": "server_args init_tokenizer_manager_func run_scheduler_process_func "
                                             "run_detokenizer_process_func execute_warmup_func launch_callback",
    "entrypoints.engine.Engine._launch_scheduler_processes": "server_args port_args run_scheduler_process_func "
                                                             "placement_group",
    "utils.watchdog.SubprocessWatchdog._check_processes": "self",
    "managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler": "self obj",
    "managers.tokenizer_manager.TokenizerManager._validate_one_request": "self obj input_ids",
    "managers.tokenizer_manager.SignalHandler.sigterm_handler": "self signum frame",
    "managers.tokenizer_manager.TokenizerManager.is_ready": "self",
    "entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._validate_request": "self _",
    "managers.data_parallel_controller.DataParallelController.__init__": "self server_args port_args "
                                                                         "run_scheduler_process_func "
                                                                         "prelaunched_schedulers",
    "managers.data_parallel_controller.DataParallelController.update_active_ranks": "self ranks",
    "managers.data_parallel_controller.DataParallelController.send_control_message": "self obj",
    "managers.scheduler.Scheduler.__init__": "self server_args port_args",
    "managers.scheduler._dispatch_event_loop_once": "scheduler",
    "managers.scheduler.Scheduler.ingest_requests": "self stop_at_pause",
    "managers.scheduler.Scheduler.process_input_requests": "self recv_reqs",
    "managers.scheduler.Scheduler.run_batch": "self batch pp_proxy_tensors",
    "managers.scheduler.Scheduler.handle_generate_request": "self recv_req mm_input_error",
    "managers.scheduler.Scheduler._release_aborted_request": "self req",
    "managers.scheduler_components.request_receiver.SchedulerRequestReceiver._pull_raw_reqs": "self",
    "managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output": "self reqs return_logprob "
                                                                                           "skip_req",
    "managers.scheduler_components.output_sender.SenderWrapper.send_output": "self output recv_obj",
    "managers.scheduler_components.ipc_channels.SchedulerIpcChannels.create": "port_args is_rank_zero "
                                                                              "skip_tokenizer_init metrics_enabled "
                                                                              "enable_scripted_runtime",
    "distributed.bootstrap._init_parallel_groups": "backend dist_init_method server_args gpu_id",
    "distributed.bootstrap._init_cpu_threads_env": "local_omp_cpuid dist_init_method",
    "mem_cache.allocator.token.TokenToKVPoolAllocator.free": "self free_index",
    "mem_cache.allocator.token.TokenToKVPoolAllocator.clear": "self",
    "mem_cache.common.match_kv_cache": "req tree_cache token_ids cow_mamba max_prefix_len",
    "mem_cache.kv_cache_configurator.KVCacheConfigurator._apply_token_constraints": "self token_capacity",
    "model_loader.utils.get_model_architecture": "model_config",
    "model_executor.model_runner.ModelRunner.init_attention_backends": "self",
    "configs.model_config.ModelConfig.get_num_kv_heads": "self tensor_parallel_size dcp_size",
    "configs.model_config.ModelConfig.get_num_attention_heads": "self tensor_parallel_size",
    "configs.update_config.adjust_config_with_unaligned_cpu_tp": "model_config load_config tp_size",
    "model_loader.weight_utils.safetensors_weights_iterator": "hf_weights_files disable_mmap prefetch "
                                                              "prefetch_num_threads drop_cache_after_load",
    "model_loader.weight_utils.buffered_multi_thread_safetensors_weights_iterator": "hf_weights_files max_workers "
                                                                                    "disable_mmap prefetch "
                                                                                    "prefetch_num_threads "
                                                                                    "drop_cache_after_load",
}
