"""sglang-ft's parts of SGLang's managers, grouped by the process they run in (as SGLang's own
`managers/scheduler_components/`): scheduler_components/ (each TP scheduler), tokenizer_manager_components/ (the
tokenizer manager), data_parallel_controller_components/ (SGLang's DP controller); io_struct.py holds the messages
between them, push_socket.py a socket helper two of them use; ft_worker.py is the SGLang side of each scheduler's
FT agent (ft/agent.py). The FT controller itself is engine-agnostic and lives in ft/controller.py."""
