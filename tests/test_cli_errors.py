"""Bad command lines under `--ft` exit non-zero before starting anything, with a message naming the flag; `--help`
lists the plugin's flags. Each case is a real `python -m sglang.launch_server` (about 20 s of imports here), so
all of them are launched at once and each test reads its own result."""

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    missing = tmp_path_factory.mktemp("cli") / "missing"
    cases = {
        "tp5": ["--ft", "--model-path", tiny_model, "--tp-size", "5"],
        "tp8": ["--ft", "--model-path", tiny_model, "--tp-size", "8"],
        "missing": ["--ft", "--model-path", str(missing), "--tp-size", "2"],
        "no-model": ["--ft", "--tp-size", "2"],
        "dp2": ["--ft", "--model-path", tiny_model, "--dp-size", "2"],
        "help": ["--help"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "sglang.launch_server", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", ["tp5", "tp8"])
def test_tp_wider_than_kv_heads(launched, case):
    proc = launched[case]
    assert proc.returncode != 0
    assert "--tp-size" in proc.stderr and "4 KV heads" in proc.stderr


def test_model_path_that_does_not_exist(launched):
    proc = launched["missing"]
    assert proc.returncode != 0
    assert "--model-path" in proc.stderr and "missing" in proc.stderr


def test_model_path_not_given(launched):
    proc = launched["no-model"]
    assert proc.returncode != 0
    assert "--model-path" in proc.stderr


def test_dp_size_not_supported_yet(launched):
    proc = launched["dp2"]
    assert proc.returncode != 0
    assert "--dp-size" in proc.stderr


def test_launch_server_help_lists_the_ft_flags(launched):
    proc = launched["help"]
    assert proc.returncode == 0
    assert "sglang-ft" in proc.stdout and "--ft " in proc.stdout


def test_more_than_one_node_is_refused_until_multinode_ft_lands(tiny_model):
    """Each node's launcher would start an FT controller of its own (seen on two network-namespace nodes)."""
    from types import SimpleNamespace

    from sglang_ft.launch_checks import check_ft_launch

    args = dict(model_path=tiny_model, trust_remote_code=False, tp_size=2, pp_size=1, dp_size=1)
    assert check_ft_launch(SimpleNamespace(**args, nnodes=1)) == []
    assert check_ft_launch(SimpleNamespace(**args, nnodes=2)) == [
        "--nnodes 2 is not supported with --ft yet (one node: use 1)"]
