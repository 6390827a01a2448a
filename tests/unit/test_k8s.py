"""deploy/k8s/: every manifest is valid Kubernetes, offline, and launches what the probes and the drain expect.

No cluster is contacted. The core objects (Deployments, Services) are checked against the Kubernetes OpenAPI schemas
shipped by `kubernetes-validate` (strict: an unknown field fails), for the oldest and the newest Kubernetes it
knows. The LeaderWorkerSet is a CRD whose schema is not vendored here: its pod templates (leaderTemplate,
workerTemplate) are checked as core/v1 pod templates with the same schemas, and the LWS fields the manifest uses
(apiVersion, kind, replicas, size, restartPolicy) by explicit assertions. Each sglang-ft command is parsed with
SGLang's own `launch_server` parser (sglang-ft's flags included), the probes' paths are looked up in the routes of
the SGLang servers that really answer them, and the grace period is checked against the drain the args configure.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.unit.test_docker import server_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.latest_version())
LWS_RESTART_POLICIES = {"RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}  # LWS v1's enum
# What LWS puts in every pod's environment, as a pod of group 0 would see it (LWS_WORKER_INDEX is set per pod).
LWS_ENV = {"LWS_LEADER_ADDRESS": "sglang-ft-multi-0.sglang-ft-multi.default", "LWS_GROUP_SIZE": "2"}
SECRET_ENV = {"SGLANG_API_KEY": "the-api-key"}


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def of_kind(name: str, kind: str) -> list[dict]:
    return [doc for doc in manifests(name) if doc["kind"] == kind]


def lws() -> dict:
    (found,) = of_kind("multi-node.yaml", "LeaderWorkerSet")
    return found


def pod_specs() -> dict[str, dict]:
    """Every pod spec that runs sglang-ft, by where it comes from."""
    specs = {f"{name}:{d['metadata']['name']}": d["spec"]["template"]["spec"]
             for name in ("single-node.yaml", "router.yaml") for d in of_kind(name, "Deployment")
             if d["metadata"]["name"] != "sglang-ft-router"}
    template = lws()["spec"]["leaderWorkerTemplate"]
    specs["multi-node.yaml:leader"] = template["leaderTemplate"]["spec"]
    specs["multi-node.yaml:worker"] = template["workerTemplate"]["spec"]
    return specs


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], value)


def launch_args(container: dict, env: dict[str, str]):
    """The container's `launch_server` command line through SGLang's parser, its `$(VAR)`s expanded from `env`."""
    assert container["command"] == ["python3", "-m", "sglang.launch_server"]
    argv = [expand(arg, env) for arg in container["args"]]
    return server_parser().parse_args(argv)


def env_for(spec: dict, source: str) -> dict[str, str]:
    env = dict(SECRET_ENV)
    if source.startswith("multi-node.yaml"):
        env |= LWS_ENV | {"LWS_WORKER_INDEX": "0" if source.endswith("leader") else "1"}
    return env


def sglang_routes() -> set[str]:
    """The paths SGLang's HTTP server (node 0) serves."""
    from sglang.srt.entrypoints.http_server import app

    return {getattr(route, "path", None) for route in app.routes}


def standin_routes(monkeypatch) -> set[str]:
    """The paths of the stand-in health server SGLang runs on nodes other than node 0 (built, not started)."""
    import uvicorn

    from sglang.srt.utils import common

    built = []

    class Stop(Exception):
        pass

    def capture(app, **_kwargs):
        built.append(app)
        raise Stop

    monkeypatch.setattr(uvicorn, "Config", capture)
    with pytest.raises(Stop):
        common.launch_dummy_health_check_server("127.0.0.1", 0, False)
    return {route.path for route in built[0].routes}


# --- schemas ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["single-node.yaml", "multi-node.yaml", "router.yaml"])
def test_core_objects_are_valid_for_kubernetes(name, version):
    core = [doc for doc in manifests(name) if doc["kind"] != "LeaderWorkerSet"]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schemas_catch_a_misspelt_field():
    """The strict check is not vacuous: one misspelt field of a probe fails it."""
    (deployment,) = of_kind("single-node.yaml", "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("role", ["leaderTemplate", "workerTemplate"])
def test_lws_pod_templates_are_valid_core_pod_templates(role, version):
    template = lws()["spec"]["leaderWorkerTemplate"][role]
    as_core = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": template}
    kubernetes_validate.validate(as_core, version, strict=True)


def test_lws_fields_it_uses():
    """The CRD's schema is not vendored: the fields used, checked against LWS v1's API by hand."""
    obj = lws()
    assert (obj["apiVersion"], obj["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert set(obj["spec"]) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy",
                                "networkConfig"}
    assert isinstance(obj["spec"]["replicas"], int) and obj["spec"]["replicas"] >= 1
    template = obj["spec"]["leaderWorkerTemplate"]
    assert set(template) == {"size", "restartPolicy", "leaderTemplate", "workerTemplate"}
    assert isinstance(template["size"], int) and template["size"] >= 2
    assert template["restartPolicy"] in LWS_RESTART_POLICIES
    (service,) = of_kind("multi-node.yaml", "Service")
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": obj["metadata"]["name"],
                                           **{"role": template["leaderTemplate"]["metadata"]["labels"]["role"]}}


# --- what the pods launch -----------------------------------------------------------------------------------------

def test_every_server_serves_ft_on_its_declared_port_with_the_api_key_from_a_secret():
    for source, spec in pod_specs().items():
        (container,) = spec["containers"]
        args = launch_args(container, env_for(spec, source))
        assert args.ft is True, source
        (port,) = container["ports"]
        assert (args.host, args.port) == ("0.0.0.0", port["containerPort"]), source
        assert args.api_key == SECRET_ENV["SGLANG_API_KEY"], source
        (key,) = [e for e in container["env"] if e["name"] == "SGLANG_API_KEY"]
        assert set(key["valueFrom"]) == {"secretKeyRef"}, source
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        nnodes = args.nnodes or 1
        assert gpus * nnodes == args.tp_size, f"{source}: {gpus} GPUs a node x {nnodes} nodes for TP {args.tp_size}"


def test_multi_node_ranks_and_rendezvous_come_from_lws():
    template = lws()["spec"]["leaderWorkerTemplate"]
    for role, rank in (("leaderTemplate", 0), ("workerTemplate", 1)):
        spec = template[role]["spec"]
        (container,) = spec["containers"]
        env = SECRET_ENV | LWS_ENV | {"LWS_WORKER_INDEX": str(rank)}
        args = launch_args(container, env)
        assert (args.nnodes, args.node_rank) == (template["size"], rank)
        assert args.dist_init_addr == f"{LWS_ENV['LWS_LEADER_ADDRESS']}:20000"
        raw = container["args"]
        assert raw[raw.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
        assert raw[raw.index("--dist-init-addr") + 1].startswith("$(LWS_LEADER_ADDRESS):")
        # The deployment secret: a file of a mounted Secret volume, the same Secret in every pod.
        secret_file = Path(args.ft_secret_file)
        (mount,) = [m for m in container["volumeMounts"] if secret_file.parent == Path(m["mountPath"])]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "sglang-ft-secret" and mount["readOnly"] is True
        assert volume["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 1000


def test_probes_point_at_paths_the_servers_serve(monkeypatch):
    """Node 0 (single node, the LWS leader) runs SGLang's HTTP server; other nodes run its stand-in health server."""
    node0, standin = sglang_routes(), standin_routes(monkeypatch)
    assert {"/health", "/ready"} <= node0  # /ready: SGLang's own, 503 when paused or shutting down
    for source, spec in pod_specs().items():
        (container,) = spec["containers"]
        args = launch_args(container, env_for(spec, source))
        served = node0 if (args.node_rank or 0) == 0 else standin
        probes = {kind: container.get(kind) for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert probes["startupProbe"]["httpGet"]["path"] == "/health", source
        assert probes["livenessProbe"]["httpGet"]["path"] == "/health", source
        if served is node0:
            assert probes["readinessProbe"]["httpGet"]["path"] == "/ready", source
        for kind, probe in probes.items():
            if probe is not None:
                assert probe["httpGet"]["path"] in served, f"{source} {kind}: {probe['httpGet']['path']}"
                assert probe["httpGet"]["port"] == container["ports"][0]["name"], source


def test_grace_period_outlasts_the_prestop_sleep_and_the_drain():
    for source, spec in pod_specs().items():
        (container,) = spec["containers"]
        args = launch_args(container, env_for(spec, source))
        drain_s = args.ft_drain_timeout_s
        pre_stop = container.get("lifecycle", {}).get("preStop")
        sleep_s = 0
        if pre_stop is not None:
            command = pre_stop["exec"]["command"]
            assert command[0] == "sleep", source
            sleep_s = int(command[1])
        assert spec["terminationGracePeriodSeconds"] > sleep_s + drain_s, source


def test_node0_pods_sleep_before_the_drain_so_endpoints_go_first():
    for source, spec in pod_specs().items():
        if source.endswith(":worker"):
            continue  # behind no Service
        (container,) = spec["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep", source


# --- the router -----------------------------------------------------------------------------------------------------

def test_router_servers_are_the_single_node_pod():
    (single,) = of_kind("single-node.yaml", "Deployment")
    servers = [d for d in of_kind("router.yaml", "Deployment") if d["metadata"]["name"] != "sglang-ft-router"]
    assert [d["metadata"]["name"] for d in servers] == ["sglang-ft-a", "sglang-ft-b"]
    for server in servers:
        assert server["spec"]["template"]["spec"] == single["spec"]["template"]["spec"]
        assert server["spec"]["strategy"] == single["spec"]["strategy"]


def test_router_sends_to_both_server_services_on_their_ports():
    docs = manifests("router.yaml")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (router,) = deployments["sglang-ft-router"]["spec"]["template"]["spec"]["containers"]
    assert router["command"] == ["python3", "-m", "sglang_router.launch_router"]
    from sglang_router.launch_router import parse_router_args  # the router's own parser

    args = parse_router_args([expand(arg, SECRET_ENV) for arg in router["args"]])
    assert args.worker_urls == ["http://sglang-ft-a:30000", "http://sglang-ft-b:30000"]
    assert (args.host, args.port, args.api_key) == ("0.0.0.0", router["ports"][0]["containerPort"],
                                                    SECRET_ENV["SGLANG_API_KEY"])
    for url in args.worker_urls:
        host, port = url.removeprefix("http://").split(":")
        service = services[host]
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == int(port)
        pods = deployments[host]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()
