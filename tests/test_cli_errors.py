"""Bad command lines under `--ft` exit non-zero before starting anything, with a message naming the flag."""

import subprocess
import sys

import pytest


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", "--ft", *args], capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("tp", ["5", "8"])
def test_tp_wider_than_kv_heads(tiny_model, tp):
    proc = _launch("--model-path", tiny_model, "--tp-size", tp)
    assert proc.returncode != 0
    assert "--tp-size" in proc.stderr and "4 KV heads" in proc.stderr


def test_model_path_that_does_not_exist(tmp_path):
    proc = _launch("--model-path", str(tmp_path / "missing"), "--tp-size", "2")
    assert proc.returncode != 0
    assert "--model-path" in proc.stderr and "missing" in proc.stderr


def test_model_path_not_given():
    proc = _launch("--tp-size", "2")
    assert proc.returncode != 0
    assert "--model-path" in proc.stderr


def test_dp_size_not_supported_yet(tiny_model):
    proc = _launch("--model-path", tiny_model, "--dp-size", "2")
    assert proc.returncode != 0
    assert "--dp-size" in proc.stderr
