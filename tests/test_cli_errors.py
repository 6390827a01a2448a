"""Bad command lines under `--ft` exit non-zero before starting anything, with a message naming the flag; `--help`
lists the plugin's flags.

Two real `python -m sglang.launch_server` runs (about 20 s of imports each here, launched at once) show the wiring:
a refused launch exits non-zero with the message, `--help` lists the flags. Every other case is the same check,
`check_ft_launch`, called on the parsed arguments directly.
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_ft.launch_checks import check_ft_launch


@pytest.fixture(scope="module")
def launched(tiny_model) -> dict[str, subprocess.CompletedProcess]:
    cases = {
        "tp5": ["--ft", "--model-path", tiny_model, "--tp-size", "5"],
        "help": ["--help"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "sglang.launch_server", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def server_args(model_path, **overrides):
    """What `check_ft_launch` reads of SGLang's ServerArgs."""
    return SimpleNamespace(**{"model_path": model_path, "trust_remote_code": False, "tp_size": 2, "pp_size": 1,
                              "dp_size": 1, "nnodes": 1, **overrides})


def test_a_refused_launch_exits_before_starting_with_the_flag_named(launched):
    proc = launched["tp5"]
    assert proc.returncode != 0
    assert "--tp-size" in proc.stderr and "4 KV heads" in proc.stderr
    assert "scheduler" not in proc.stderr.lower()  # nothing was started


def test_launch_server_help_lists_the_ft_flags(launched):
    proc = launched["help"]
    assert proc.returncode == 0
    assert "sglang-ft" in proc.stdout and "--ft " in proc.stdout


def test_a_good_launch_has_no_problem(tiny_model):
    assert check_ft_launch(server_args(tiny_model)) == []


@pytest.mark.parametrize("tp", [5, 8])
def test_tp_wider_than_kv_heads(tiny_model, tp):
    problems = check_ft_launch(server_args(tiny_model, tp_size=tp))
    assert len(problems) == 1 and "--tp-size" in problems[0] and "4 KV heads" in problems[0]


def test_model_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "missing")
    [problem] = check_ft_launch(server_args(missing))
    assert "--model-path" in problem and "missing" in problem


def test_model_path_not_given():
    assert check_ft_launch(server_args(None)) == ["--model-path is required"]


@pytest.mark.parametrize("flag", ["dp_size", "pp_size"])
def test_dp_and_pp_not_supported_yet(tiny_model, flag):
    [problem] = check_ft_launch(server_args(tiny_model, **{flag: 2}))
    assert f"--{flag.replace('_', '-')} 2" in problem


def test_more_than_one_node_is_refused_until_multinode_ft_lands(tiny_model):
    """Each node's launcher would start an FT controller of its own (seen on two network-namespace nodes)."""
    assert check_ft_launch(server_args(tiny_model, nnodes=2)) == [
        "--nnodes 2 is not supported with --ft yet (one node: use 1)"]
