"""vllm-router (from PyPI, pinned) in P/D mode in front of emulated engines.

The router is installed into its own venv under runs/peers/ (as scripts/bench_peers.py does) the
first time; without network access the test is skipped, saying so. It checks what a user of
vllm-router would rely on: both legs reach the engines in NixlConnector's shape (the decode
engine pulls the KV the prefill engine announced), streamed and plain answers come back whole.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from dualmap_pd.cost import get_profile
from scheduler.emulator.cluster import EmulatedCluster, WordTokenizer
from scheduler.emulator.engine import ScaledClock
from tests.test_emulator import _config, _free_ports

REPO = Path(__file__).resolve().parents[1]
VLLM_ROUTER = ("vllm-router", "0.1.17")


def _install_vllm_router() -> Path:
    name, version = VLLM_ROUTER
    venv = REPO / "runs" / "peers" / f"{name}-{version}"
    binary = venv / "bin" / name
    if binary.exists():
        return binary
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{name}=={version}"], check=True,
                       capture_output=True, timeout=600)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install {name}=={version} from PyPI: {exc}")
    return binary


@pytest.fixture(scope="module")
def vllm_router() -> Path:
    return _install_vllm_router()


def test_vllm_router_pd_over_emulated_engines(vllm_router: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    port, prom = _free_ports(2)

    async def body() -> None:
        async with EmulatedCluster(cfg, get_profile("llama8b-h100"), ScaledClock(20.0),
                                   tokenizer=WordTokenizer()) as emu:  # fmt: skip
            cmd = [str(vllm_router), "--host", "127.0.0.1", "--port", str(port), "--prometheus-host",
                   "127.0.0.1", "--prometheus-port", str(prom), "--vllm-pd-disaggregation",
                   "--policy", "cache_aware", "--log-level", "warning"]  # fmt: skip
            for inst in cfg.prefill:
                cmd += ["--prefill", inst.url]
            cmd += ["--decode", cfg.decode[0].url]
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:
                async with aiohttp.ClientSession() as session:
                    for _ in range(200):
                        try:
                            async with session.get(url + "/health") as resp:
                                if resp.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)
                    prompt = " ".join(["ka ri to na mi su"] * 20)
                    body = {"model": "tiny", "prompt": prompt, "max_tokens": 5}
                    async with session.post(url + "/v1/completions", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        answer = await resp.json()
                    assert answer["choices"][0]["text"] == " t0 t1 t2 t3 t4"
                    chunks = []
                    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
                        assert resp.status == 200
                        async for line in resp.content:
                            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                                chunks.append(json.loads(line[6:]))
                    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " t0 t1 t2 t3 t4"
            finally:
                proc.terminate()
                await proc.wait()
            prefill_legs = [r for i in cfg.prefill for r in emu.instances[i.name].server.requests]
            decode_legs = emu.instances["decode-0"].server.requests
            assert len(prefill_legs) == 2 and len(decode_legs) == 2
            assert all(r["kv_transfer_params"]["do_remote_decode"] for r in prefill_legs)
            assert all(r["kv_transfer_params"]["remote_engine_id"].startswith("prefill-") for r in decode_legs)
            assert emu.instances["decode-0"].server.kv.nixl_transfers == 2

    asyncio.run(asyncio.wait_for(body(), 120))
