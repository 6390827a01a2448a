"""The faults sglang-ft injects into a TP worker, listed once: the HTTP route, `sglang-ft-ctl inject`, the controller,
the worker and fault traces all take them from here.

The controller delivers every fault as a signal to the worker's process. kill, hang and resume are the signal itself
(SIGKILL, SIGSTOP, SIGCONT). The others arm the worker, which acts at a precise point of its next step:
- kill_unsent: it SIGKILLs itself after its next step, before that step's output leaves (a rank 0's computed tokens
  never reach the client: the race a real death can hit, made certain);
- fail_step: it takes its next step as failed once its forward is done, as if its last collective timed out there
  alone, while the others finish it (a torn step: what a rank dying inside the last all-gather leaves);
- kill_uncopied: it SIGKILLs itself right after its next step's forward, before that step's KV is copied for the
  backup store (the worst instant for the backup: the step's rows are lost with it).
"""

from __future__ import annotations

import signal

FAULT_SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "resume": signal.SIGCONT,
                 "kill_unsent": signal.SIGUSR1, "fail_step": signal.SIGUSR2, "kill_uncopied": signal.SIGURG}
FAULT_KINDS = tuple(FAULT_SIGNALS)
PROCESS_FAULTS = ("kill", "hang", "resume")  # the signal is the fault: what a fault trace replays
ARMED_FAULTS = tuple(kind for kind in FAULT_KINDS if kind not in PROCESS_FAULTS)  # the worker acts on them itself
FAULT_HELP = ("SIGKILL, SIGSTOP or SIGCONT; kill_unsent: SIGKILL at the end of its next step, before that step's "
              "output is sent; fail_step: its next step fails there alone after the forward (the others finish it), "
              "and the group regroups with every worker; kill_uncopied: SIGKILL right after its next step's "
              "forward, before that step's KV is backed up")
