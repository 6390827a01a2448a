"""sglang-ft inside each TP scheduler process: output rewind after a new rank 0, moved requests from a lost replica
(and their KV), the worker load shown in `/ft/status`; and the adapters of `sglang.srt.managers.scheduler_components`
(the scheduler's request intake, output and channels: request_receiver, output_streamer, output_sender,
ipc_channels)."""
