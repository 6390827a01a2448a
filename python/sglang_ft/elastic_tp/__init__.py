"""Elastic tensor parallelism: the in-place regroup of a surviving scheduler process to a new TP group (as SGLang
keeps elastic expert parallelism in `srt/elastic_ep/`). Everything here runs in the scheduler processes.

- regroup.py: the stages, in order, and the migration plan (computed here, by the members, from what each holds);
- groups.py: SGLang's process groups rebuilt for the new world on a fresh store;
- torn_step.py, park_requests.py, received_requests.py: every rank's requests made identical and parked in the
  radix cache with their KV (received_requests: what each scheduler received, reconciled after the regroup);
- scheduler_sync.py: joiners take rank 0's scheduler state;
- reshard.py: the weights resharded by the plan (keep, peer to peer, disk);
- kv_restore.py, partial_restore.py: the KV pool reshaped to the new heads and refilled, or cut where rows lack;
- joiner.py: a restarted worker, initialised apart until a regroup plans it in.
"""
