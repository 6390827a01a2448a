"""sglang-ft's engine-agnostic fault-tolerance library.

Nothing here imports sglang or sglang_ft: it is plain data and algorithms that the SGLang side (python/sglang_ft)
drives, unit-tested without a model.

- partition.py: unequal-width tensor-parallel layouts (whole GQA groups, MLP columns, vocabulary) as data.
- planner.py: Continuous Minimal Migration: the new layout that moves the fewest bytes, and its transfer schedule.
- membership.py, failure_detector.py: epochs, worker states, heartbeat-timeout detection.
- respawn.py: when to restart a dead worker and when to give up on a restart.
- heartbeat.py, messages.py: heartbeats and typed (msgspec) messages over ZMQ.
- sockets.py: every ZMQ socket of the runtime; across nodes CURVE-keyed by the deployment secret, refusals counted.
- kv_backup.py, kv_store.py: the KV backup wire format, the non-blocking sender, the store process.
- fault_trace.py: the fault trace format and a generator from published GPU failure rates.
- ports.py: loopback port allocation.
"""
