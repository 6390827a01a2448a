"""scripts/gpu_check.py, the GPU acceptance check: on a machine without two CUDA devices and SGLang's CUDA build it
says why and exits 0 (the check itself needs the GPUs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_without_two_gpus_the_check_says_it_skipped_and_exits_0():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    if gpu_check.gpus() >= 2:
        pytest.skip("this machine has the GPUs: scripts/gpu_check.py runs the check itself")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (done.returncode, done.stdout.strip()) == (0, "skipped: needs >= 2 CUDA devices and SGLang's CUDA build")
