"""`dualmap-pd launch --add-prefill NAME --register URL` and the admin client, against a running
scheduler over fake engines. The launched "vLLM" is the fake server (tests/fakes/vllm_stub)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scheduler.http.admin import ADMIN_TOKEN_ENV
from scheduler.membership.admin_client import AdminClient, AdminRequestError
from scheduler.config import ConfigError, config_from_dict
from scheduler.membership.scale_out import ScaleOutRequest, new_instance
from tests.service_harness import cluster, completion, eventually, run

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_STUB = REPO_ROOT / "tests" / "fakes" / "vllm_stub"
TOKEN = "scale-out-admin-token-0123456789"


def _config_dict(run_dir: Path, prefill_ports: list[int], decode_port: int) -> dict[str, object]:
    return {
        "model": "/nonexistent/fake-model", "served_model_name": "fake-model", "block_size": 16,
        "max_model_len": 256, "run_dir": str(run_dir), "scheduler": {"port": 40999},
        "prefill": [{"name": f"prefill-{i}", "port": p, "nixl_side_channel_port": 41500 + i,
                     "kv_events_port": 41600 + i} for i, p in enumerate(prefill_ports)],
        "decode": [{"name": "decode-0", "port": decode_port, "nixl_side_channel_port": 41700}],
    }  # fmt: skip


def test_new_instance_takes_given_ports_and_picks_free_ones_above_the_config(tmp_path: Path) -> None:
    cfg = config_from_dict(_config_dict(tmp_path, [41000, 41001], 41002))
    inst = new_instance(cfg, ScaleOutRequest(role="prefill", name="extra", port=41950))
    assert inst.port == 41950 and inst.role == "prefill"
    assert inst.nixl_side_channel_port > 41700 and inst.kv_events_port > 41700
    assert inst.nixl_side_channel_port != inst.kv_events_port
    decode = new_instance(cfg, ScaleOutRequest(role="decode", name="d-extra", cpus="1"))
    assert decode.kv_events_port is None and decode.cpus == "1" and decode.port > 41700
    with pytest.raises(ConfigError):
        new_instance(cfg, ScaleOutRequest(role="prefill", name="bad/name"))


def test_admin_client_adds_and_removes_and_reports_refusals() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, admin={"token": TOKEN}) as h:
            client = AdminClient(h.url, TOKEN)
            names = [i["name"] for i in await asyncio.to_thread(client.instances)]
            assert names == ["prefill-0", "prefill-1", "decode-0"]
            bad = AdminClient(h.url, "wrong-token-wrong-token-wrong")
            with pytest.raises(AdminRequestError, match="invalid admin token") as info:
                await asyncio.to_thread(bad.instances)
            assert info.value.status == 403
            assert (await asyncio.to_thread(client.remove, "prefill-1"))["status"] == "removed"
            assert await asyncio.to_thread(client.wait_removed, "prefill-1", 2.0)
            with pytest.raises(AdminRequestError) as info:
                await asyncio.to_thread(client.drain, "prefill-1")
            assert info.value.status == 404
            unreachable = AdminClient("http://127.0.0.1:9", TOKEN, timeout_s=1.0)
            with pytest.raises(AdminRequestError, match="unreachable"):
                await asyncio.to_thread(unreachable.instances)

    run(body)


def test_launch_add_prefill_registers_then_deregisters_on_sigterm(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, admin={"token": TOKEN}) as h:
            raw = _config_dict(tmp_path / "runs", [s.port for s in h.prefill], h.decode[0].port)
            path = tmp_path / "cluster.yaml"
            path.write_text(yaml.safe_dump(raw))
            env = {**os.environ, ADMIN_TOKEN_ENV: TOKEN, "PYTHONPATH": f"{VLLM_STUB}:{REPO_ROOT}"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(path),
                 "--add-prefill", "prefill-extra", "--register", h.url, "--no-pin", "--spinners", "leave"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                view = h.scheduler.view
                assert await eventually(lambda: "prefill-extra" in view and view["prefill-extra"].eligible,
                                        timeout=20)  # fmt: skip
                served = set()
                for i in range(30):
                    _, headers, _ = await h.post("/v1/completions", completion(f"scale-out prompt {i} " * 3))
                    served.add(headers["X-DualMap-Prefill-Instance"])
                assert "prefill-extra" in served
                proc.send_signal(signal.SIGTERM)
                assert await eventually(lambda: "prefill-extra" not in view, timeout=20)
                code = await asyncio.to_thread(proc.wait, 30)
                out = proc.stdout.read() if proc.stdout else ""
                assert code == 128 + signal.SIGTERM, out
                assert "registered with" in out and "deregistered prefill-extra" in out
                assert "prefill-extra stopped" in out
                assert (await h.post("/v1/completions", completion("after")))[0] == 200
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    asyncio.run(asyncio.wait_for(body(), timeout=90))


def test_launch_register_needs_an_extra_instance_and_a_token(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_config_dict(tmp_path, [41000, 41001], 41002)))
    env = {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV}
    base = [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(path)]
    no_extra = subprocess.run([*base, "--register", "http://127.0.0.1:1"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_extra.returncode == 2 and "--add-prefill" in no_extra.stdout
    no_token = subprocess.run([*base, "--add-prefill", "x", "--register", "http://127.0.0.1:1"],
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_token.returncode == 2 and ADMIN_TOKEN_ENV in no_token.stdout
