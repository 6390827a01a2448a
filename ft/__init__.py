"""sglang-ft's fault-tolerance runtime, engine-agnostic (torchft is the same for training).

Nothing here imports sglang, sglang_ft or torch (tests/unit/test_ft_layering.py): the SGLang side
(python/sglang_ft) drives it and gives it callbacks; it is unit-tested without a model.

- controller.py: the FT controller process: failure detection, regroup orders, restarts, the control API.
- agent.py: the worker's side: heartbeats, orders, fencing, the wait-for-an-order loop; the engine as callbacks.
- options.py: the controller's and the agent's options, passed in (built from the CLI by the SGLang side).
- faults.py: the injectable fault kinds and their signals, listed once.
- metrics.py: the controller's state as Prometheus metrics. kv_store_keeper.py: runs the KV backup store beside it.
- partition.py: unequal-width tensor-parallel layouts (whole GQA groups, MLP columns, vocabulary) as data;
  model_config.py: a model's shape from its HuggingFace config.
- planner.py: Continuous Minimal Migration: the new layout that moves the fewest bytes, and its transfer schedule.
- membership.py, failure_detector.py: epochs, worker states, heartbeat-timeout detection.
- respawn.py: when to restart a dead worker and when to give up on a restart.
- heartbeat.py, messages.py: heartbeats and typed (msgspec) messages over ZMQ.
- sockets.py: every ZMQ socket of the runtime; across nodes CURVE-keyed by the deployment secret, refusals counted.
- kv_backup.py, kv_store.py: the KV backup wire format, the non-blocking sender, the store process.
- remainder_routing.py: which worker owns a request's remainder heads (the routing policies, listed once).
- fault_trace.py: the fault trace format and a generator from published GPU failure rates.
- ports.py: loopback port allocation.
"""
