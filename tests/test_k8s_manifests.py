"""deploy/k8s renders, and what it renders agrees with the cluster YAML it carries.

Rendered with ``kubectl kustomize`` where kubectl exists (it does on the project's machines),
else with tests/kustomize_lite.py, a Python renderer of the subset of kustomize we use; where
both exist, the two must give the same objects. For each overlay the ConfigMap's cluster YAML
is loaded with the product's own loader, and every engine instance's vLLM command is built with
scheduler/local/vllm_cmd.py (what ``dualmap-pd launch --node`` runs in the pod): its ports,
host and side channel must be the ones the StatefulSet and its headless Service declare.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.config import ClusterConfig, config_from_dict
from scheduler.local.vllm_cmd import server_command, server_env
from tests import kustomize_lite

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["overlays/cpu", "overlays/gpu-infiniband"]
Obj = dict[str, Any]


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@cache
def _kubectl(directory: str) -> tuple[Obj, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / directory)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return tuple(sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key))


def render(directory: str) -> list[Obj]:
    if shutil.which("kubectl"):
        return [json.loads(json.dumps(o)) for o in _kubectl(directory)]  # a fresh copy
    return sorted(kustomize_lite.render(K8S / directory), key=_key)


def get(objs: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = [o for o in objs if _key(o) == (kind, name)]
    return obj


def carried_config(objs: list[Obj]) -> ClusterConfig:
    data = get(objs, "ConfigMap", "dualmap-cluster")["data"]
    return config_from_dict(yaml.safe_load(data["cluster.yaml"]), base_dir="/etc/dualmap")


def container(workload: Obj, name: str) -> Obj:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_values(c: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def config_path(workload: Obj, c: Obj) -> str:
    """Where the ConfigMap's cluster.yaml appears in this container."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"]
                if volumes[m["name"]].get("configMap", {}).get("name") == "dualmap-cluster"]  # fmt: skip
    return f"{mount['mountPath']}/cluster.yaml"


def bound_ports(cfg: ClusterConfig, name: str) -> set[int]:
    """Every port the instance's vLLM command (built by vllm_cmd) listens on."""
    inst = cfg.instance(name)
    cmd, env = server_command(cfg, inst, "python"), server_env(cfg, inst)
    ports = {int(cmd[cmd.index("--port") + 1]), int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"])}
    if "--kv-events-config" in cmd:
        events = json.loads(cmd[cmd.index("--kv-events-config") + 1])
        ports |= {int(events[k].rsplit(":", 1)[1]) for k in ("endpoint", "replay_endpoint") if k in events}
    return ports


def test_kubectl_and_the_python_renderer_agree() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: only the Python renderer runs here")
    for directory in [".", *OVERLAYS]:
        assert sorted(kustomize_lite.render(K8S / directory), key=_key) == render(directory), directory


def test_the_default_kustomization_is_the_cpu_overlay() -> None:
    assert render(".") == render("overlays/cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_statefulsets_match_the_carried_cluster_yaml(overlay: str) -> None:
    objs = render(overlay)
    cfg = carried_config(objs)
    for role, instances in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        sts = get(objs, "StatefulSet", role)
        svc = get(objs, "Service", sts["spec"]["serviceName"])
        # One pod per instance, named as the YAML names them, at the DNS name the YAML lists.
        assert sts["spec"]["replicas"] == len(instances)
        assert [i.name for i in instances] == [f"{role}-{n}" for n in range(len(instances))]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        engine = container(sts, "engine")
        env = env_values(engine)
        assert env["POD_HOST"] == f"$(POD_NAME).{svc['metadata']['name']}"
        for n, inst in enumerate(instances):
            pod_host = env["POD_HOST"].replace("$(POD_NAME)", f"{role}-{n}")
            assert inst.host == pod_host, (inst.name, inst.host)
        # The pod runs the launcher for its own host: the command vllm_cmd builds from this YAML.
        args = engine["args"]
        assert engine["command"] == ["dualmap-pd"] and args[0] == "launch"
        assert args[args.index("--node") + 1] == "$(POD_HOST)"
        assert args[args.index("--config") + 1] == config_path(sts, engine)
        assert not {"VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT"} & env.keys()  # from the YAML
        declared = {p["containerPort"] for p in engine["ports"]}
        published = {p["port"] for p in svc["spec"]["ports"]}
        http = {p["name"]: p["containerPort"] for p in engine["ports"]}["http"]
        for inst in instances:
            cmd, inst_env = server_command(cfg, inst, "python"), server_env(cfg, inst)
            assert cmd[cmd.index("--host") + 1] == inst_env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == inst.host
            assert bound_ports(cfg, inst.name) == declared == published, inst.name
            assert inst.port == http
        # It binds its DNS name, so it starts once that resolves (an init container waits).
        (wait,) = [c for c in sts["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-for-dns"]
        assert f'getent hosts "$POD_NAME.{svc["metadata"]["name"]}"' in wait["command"][2]
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert engine[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        # The model the YAML names lives on the pod's `models` volume.
        mounts = {m["name"]: m["mountPath"] for m in engine["volumeMounts"]}
        assert str(cfg.model).startswith(mounts["models"] + "/")
        assert str(cfg.run_dir).startswith(mounts["run"] + "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_deployment_and_service_match_the_carried_cluster_yaml(overlay: str) -> None:
    objs = render(overlay)
    cfg = carried_config(objs)
    dep = get(objs, "Deployment", "dualmap-scheduler")
    svc = get(objs, "Service", "dualmap-scheduler")
    sched = container(dep, "scheduler")
    assert dep["spec"]["replicas"] > 1  # stateless replicas: docs/replicas.md
    assert sched["args"][:3] == ["serve", "--config", config_path(dep, sched)]
    assert cfg.scheduler.host == "0.0.0.0"  # reachable on the pod's IP
    (port,) = sched["ports"]
    assert port["containerPort"] == cfg.scheduler.port
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"] and svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert sched["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.scheduler.port)
    mounts = {m["name"]: m["mountPath"] for m in sched["volumeMounts"]}
    assert str(cfg.model).startswith(mounts["models"] + "/")  # the tokenizer
    assert cfg.admin.watch_config  # the ConfigMap is edited in place to change membership


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_uses_the_overlays_image_and_finds_its_model(overlay: str) -> None:
    objs = render(overlay)
    cfg = carried_config(objs)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    images = {c["image"] for w in workloads
              for c in w["spec"]["template"]["spec"]["containers"] + w["spec"]["template"]["spec"].get("initContainers", [])}  # fmt: skip
    assert len(images) == 1 and ":" in next(iter(images))
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        if overlay.endswith("cpu"):  # built in the pod, at the path the YAML names
            (init,) = [c for c in spec["initContainers"] if c["name"] == "build-tiny-model"]
            assert init["command"] == ["dualmap-pd", "build-tiny-model", "--out", str(cfg.model)]
            assert "emptyDir" in models
        else:
            assert models["persistentVolumeClaim"] == {"claimName": "dualmap-models", "readOnly": True}


def test_gpu_overlay_carries_the_rdma_settings() -> None:
    objs = render("overlays/gpu-infiniband")
    cfg = carried_config(objs)
    assert cfg.engine.kv_buffer_device == "cuda" and cfg.block_size == 16
    for role in ("prefill", "decode"):
        engine = container(get(objs, "StatefulSet", role), "engine")
        env = env_values(engine)
        assert "rc" in env["UCX_TLS"].split(",") and env["UCX_NET_DEVICES"]
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "IPC_LOCK" in engine["securityContext"]["capabilities"]["add"]
        cmd = server_command(cfg, cfg.instances[0], "python")
        assert json.loads(cmd[cmd.index("--kv-transfer-config") + 1])["kv_buffer_device"] == "cuda"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_provision_the_grafana_dashboard(overlay: str) -> None:
    cm = get(render(overlay), "ConfigMap", "dualmap-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (K8S / "grafana" / "dualmap-pd.json").read_text()
    assert json.loads(cm["data"]["dualmap-pd.json"]) == json.loads(shipped)


def test_replay_job_targets_the_scheduler_service() -> None:
    cfg = carried_config(render("overlays/cpu"))
    job = yaml.safe_load((K8S / "jobs" / "replay.yaml").read_text())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][c["args"].index("--url") + 1] == f"http://dualmap-scheduler:{cfg.scheduler.port}"
    trace = c["args"][c["args"].index("--trace") + 1]
    assert c["workingDir"] == "/opt/dualmap-pd" and (REPO / trace).is_file()  # copied into the image
