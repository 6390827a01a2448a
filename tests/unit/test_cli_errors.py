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
from tests.early import Background, taken


def start_early(request) -> dict[str, Background]:
    """The two launches, started with the test session (tests/early.py)."""
    cases = {
        "tp5": ["--ft", "--model-path", request.getfixturevalue("tiny_model"), "--tp-size", "5"],
        "help": ["--help"],
    }
    return {name: Background([sys.executable, "-m", "sglang.launch_server", *argv]) for name, argv in cases.items()}


@pytest.fixture(scope="module")
def launched(request) -> dict[str, subprocess.CompletedProcess]:
    return {name: job.result() for name, job in taken(request, start_early).items()}


def server_args(model_path, **overrides):
    """What `check_ft_launch` reads of SGLang's ServerArgs."""
    return SimpleNamespace(**{"model_path": model_path, "trust_remote_code": False, "tp_size": 2, "pp_size": 1,
                              "dp_size": 1, "nnodes": 1, "dist_init_addr": None, **overrides})


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


@pytest.mark.parametrize("flag", ["pp_size", "attn_dp_size"])
def test_pp_and_attention_dp_not_supported_yet(tiny_model, flag):
    [problem] = check_ft_launch(server_args(tiny_model, **{flag: 2}))
    assert f"--{flag.replace('_', '-')} 2" in problem


def test_data_parallel_replicas_on_one_node_each_with_its_own_runtime(tiny_model):
    from sglang_ft.server_args import FtArgs

    assert check_ft_launch(server_args(tiny_model, dp_size=2)) == []
    [problem] = check_ft_launch(server_args(tiny_model, dp_size=2, nnodes=2, dist_init_addr="10.0.0.1:5000"))
    assert "--dp-size 2 with --nnodes 2" in problem
    ft = FtArgs(enabled=True, runtime_dir="/tmp/x", dp_size=2)
    assert [ft.for_replica(k).order_endpoint for k in (0, 1)] == ["ipc:///tmp/x/dp0/orders", "ipc:///tmp/x/dp1/orders"]
    assert FtArgs(runtime_dir="/tmp/x").for_replica(0).order_endpoint == "ipc:///tmp/x/orders"
    [problem] = FtArgs(dp_size=2, respawn=True).problems()
    assert "--ft-respawn" in problem and "--dp-size" in problem


def test_more_than_one_node_needs_the_address_of_node_0(tiny_model):
    """The FT controller runs on node 0; every node's workers reach it there."""
    assert check_ft_launch(server_args(tiny_model, nnodes=2, dist_init_addr="10.0.0.1:5000")) == []
    [problem] = check_ft_launch(server_args(tiny_model, nnodes=2))
    assert "--nnodes 2" in problem and "--dist-init-addr" in problem
    [problem] = check_ft_launch(server_args(tiny_model, nnodes=2, dist_init_addr="[fd00::1]:5000"))
    assert "--dist-init-addr [fd00::1]:5000 is IPv6" in problem


def test_across_nodes_the_controller_is_reached_over_tcp_at_node_0():
    from sglang_ft.server_args import CONTROLLER_PORT_OFFSET, FtArgs, across_nodes

    one = FtArgs(enabled=True, runtime_dir="/tmp/x")
    assert across_nodes(one, SimpleNamespace(nnodes=1)) is one and one.heartbeat_endpoint == "ipc:///tmp/x/heartbeat"
    two = across_nodes(one, SimpleNamespace(nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000"))
    base = 5000 + CONTROLLER_PORT_OFFSET
    assert (two.nnodes, two.node_rank, two.rendezvous_host) == (2, 1, "10.0.0.1")
    assert [two.heartbeat_endpoint, two.control_endpoint, two.order_endpoint, two.kv_backup_endpoint,
            two.kv_fetch_endpoint] == [f"tcp://10.0.0.1:{base + i}" for i in range(5)]
    assert FtArgs(nnodes=2, controller_host="127.0.0.1", respawn=True).problems() == [
        "--ft-respawn is not supported with --nnodes > 1 yet (a node restarts its own workers)"]


def test_across_nodes_the_secret_file_is_required_unless_every_endpoint_is_loopback(tmp_path):
    import argparse

    from sglang_ft.server_args import FtArgs, across_nodes, add_ft_cli_args

    def across(addr: str, secret_file: str = "") -> FtArgs:
        return across_nodes(FtArgs(enabled=True, secret_file=secret_file),
                            SimpleNamespace(nnodes=2, node_rank=0, dist_init_addr=addr))

    [problem] = across("10.0.0.1:5000").problems()
    assert "--nnodes 2 with --ft needs --ft-secret-file" in problem and "10.0.0.1" in problem
    [problem] = across("node0.cluster:5000").problems()
    assert "--ft-secret-file" in problem
    assert across("127.0.0.1:5000").problems() == [] and across("localhost:5000").problems() == []
    assert FtArgs(enabled=True).problems() == []  # one node: ipc only

    good = tmp_path / "secret"
    good.write_text("0123456789abcdef0123456789abcdef\n")
    assert across("10.0.0.1:5000", str(good)).problems() == []
    (tmp_path / "short").write_text("short\n")
    for path, why in ((tmp_path / "missing", "cannot read it"), (tmp_path, "cannot read it"),
                      (tmp_path / "short", "it holds 5 bytes, at least 16")):
        [problem] = across("10.0.0.1:5000", str(path)).problems()
        assert problem.startswith(f"--ft-secret-file {path}: {why}")
        [problem] = FtArgs(enabled=True, secret_file=str(path)).problems()  # a bad file is refused on one node too
        assert problem.startswith("--ft-secret-file")

    parser = argparse.ArgumentParser()
    add_ft_cli_args(parser)
    ft = FtArgs.from_namespace(parser.parse_args(["--ft", "--ft-secret-file", "secret"]))
    assert ft.secret_file == str(tmp_path.cwd() / "secret")  # absolute: the controller and store read it too
    assert FtArgs.from_namespace(parser.parse_args(["--ft"])).secret_file == ""


def test_cyclic_placement_and_hybrid_attention_together_are_refused_naming_both_flags():
    from sglang_ft.server_args import FtArgs

    problems = FtArgs(attention="hybrid", kv_placement="cyclic").problems()
    assert len(problems) == 1 and "--ft-kv-placement cyclic" in problems[0] and "--ft-attention hybrid" in problems[0]
    assert FtArgs(kv_placement="cyclic").problems() == [] and FtArgs(kv_placement="cyclic").splits_remainder


def test_quantization_flag_is_refused_at_launch_naming_it(tiny_model):
    [problem] = check_ft_launch(server_args(tiny_model, quantization="fp8"))
    assert "--quantization fp8" in problem


def test_a_quantized_checkpoint_is_refused_at_launch_naming_the_model_path(tiny_model, tmp_path):
    import json
    import shutil

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(config))
    [problem] = check_ft_launch(server_args(str(quantized)))
    assert "--model-path" in problem and "gptq" in problem and "quantized" in problem


@pytest.mark.parametrize("argv, flag", [(["--ft-weight-cache", "disk"], "--ft-weight-cache"),
                                        (["--ft-weight-cache-max-gb", "-1"], "--ft-weight-cache-max-gb"),
                                        (["--ft-weight-cache-max-gb", "nan"], "--ft-weight-cache-max-gb")])
def test_a_bad_weight_cache_flag_is_refused_by_name(capsys, argv, flag):
    import argparse

    from sglang_ft.server_args import FtArgs, add_ft_cli_args

    parser = argparse.ArgumentParser(prog="sglang serve")
    add_ft_cli_args(parser)
    try:
        problems = FtArgs.from_namespace(parser.parse_args(["--ft", *argv])).problems()
    except SystemExit as exc:  # argparse refuses a value outside the flag's choices
        assert exc.code == 2 and flag in capsys.readouterr().err
        return
    assert len(problems) == 1 and problems[0].startswith(flag)


def test_the_weight_cache_is_on_by_default_and_can_be_turned_off():
    import argparse

    from sglang_ft.server_args import FtArgs, add_ft_cli_args

    parser = argparse.ArgumentParser()
    add_ft_cli_args(parser)
    assert FtArgs.from_namespace(parser.parse_args(["--ft"])).weight_cache == "host"
    off = FtArgs.from_namespace(parser.parse_args(["--ft", "--ft-weight-cache", "off",
                                                   "--ft-weight-cache-max-gb", "2"]))
    assert (off.weight_cache, off.weight_cache_max_gb, off.problems()) == ("off", 2.0, [])
