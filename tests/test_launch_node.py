"""`dualmap-pd launch --node HOST`: one cluster YAML for a multi-node deployment, each node
starting only its own instances, every address taken from the config. The launched "vLLM" is
the fake server (tests/fakes/vllm_stub); tests/test_multihost.py does the same with real
engines in network namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from scheduler.config import ConfigError, config_from_dict
from scheduler.local.launcher import health_ok, instances_on_node
from scheduler.local.vllm_cmd import server_command, server_env

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_STUB = REPO_ROOT / "tests" / "fakes" / "vllm_stub"
NODE_A, NODE_B = "127.0.0.1", "127.0.0.2"  # two loopback addresses: two "nodes" on one machine


def _config(run_dir: Path, model: Path) -> dict[str, object]:
    return {
        "model": str(model), "served_model_name": "fake-model", "block_size": 16,
        "max_model_len": 256, "run_dir": str(run_dir), "scheduler": {"port": 8799},
        "prefill": [
            {"name": "prefill-0", "host": NODE_A, "port": 8760, "kv_events_port": 6060,
             "nixl_side_channel_port": 6070},
            {"name": "prefill-1", "host": NODE_B, "port": 8761, "kv_events_port": 6061,
             "nixl_side_channel_port": 6071},
        ],
        "decode": [{"name": "decode-0", "host": NODE_B, "port": 8762, "nixl_side_channel_port": 6072}],
    }  # fmt: skip


def test_instances_on_node_selects_by_host_and_names_the_hosts_when_none_match(tmp_path: Path) -> None:
    cfg = config_from_dict(_config(tmp_path, tmp_path))
    assert instances_on_node(cfg, NODE_B) == ["prefill-1", "decode-0"]
    assert instances_on_node(cfg, NODE_A) == ["prefill-0"]
    with pytest.raises(ConfigError, match=r"no instance has host '10.9.9.9' \(hosts in the config: "
                       r"127.0.0.1, 127.0.0.2\)"):  # fmt: skip
        instances_on_node(cfg, "10.9.9.9")


def test_every_bind_and_side_channel_address_comes_from_the_config(tmp_path: Path) -> None:
    raw = _config(tmp_path, tmp_path)
    raw["prefill"][0]["host"] = "prefill-0.prefill"  # type: ignore[index]  # a StatefulSet DNS name
    cfg = config_from_dict(raw)
    inst = cfg.instance("prefill-0")
    cmd = server_command(cfg, inst, "python")
    env = server_env(cfg, inst)
    assert cmd[cmd.index("--host") + 1] == "prefill-0.prefill"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "prefill-0.prefill"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "6070"
    # vLLM binds a KV-event socket only for a "*" endpoint (a host would make it connect out);
    # the scheduler subscribes at the configured host.
    assert '"endpoint": "tcp://*:6060"' in cmd[cmd.index("--kv-events-config") + 1]
    assert inst.kv_events_endpoint == "tcp://prefill-0.prefill:6060"


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in launch output:\n{''.join(lines)}")


def test_launch_node_starts_only_that_nodes_instances_on_their_own_addresses(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "runs", model)))
    env = {**os.environ, "PYTHONPATH": f"{VLLM_STUB}:{REPO_ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(path), "--node", NODE_B,
         "--no-pin", "--spinners", "leave", "--timeout", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = "".join(_wait_for_line(proc, "SIGTERM stops everything", 60))
        assert "started 2 server(s)" in out
        assert "prefill-1" in out and "decode-0" in out and "prefill-0" not in out
        assert health_ok(f"http://{NODE_B}:8761") and health_ok(f"http://{NODE_B}:8762")
        assert not health_ok(f"http://{NODE_A}:8760")  # the other node's instance
        # Bound to the config's address, not to every interface: not reachable on NODE_A.
        assert not health_ok(f"http://{NODE_A}:8761")
        logged = (tmp_path / "runs" / "prefill-1" / "server.log").read_text().splitlines()[0]
        assert f"--host {NODE_B} --port 8761" in logged
        assert not (tmp_path / "runs" / "prefill-0").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 128 + signal.SIGTERM
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{NODE_B}:8761/health", timeout=2)


def test_launch_node_rejects_an_unknown_node_and_extra_instances(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "runs", tmp_path)))
    base = [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(path)]
    unknown = subprocess.run([*base, "--node", "10.9.9.9"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no instance has host '10.9.9.9'" in unknown.stdout
    both = subprocess.run([*base, "--node", NODE_A, "--add-prefill", "x"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert both.returncode == 2 and "drop --node" in both.stdout
