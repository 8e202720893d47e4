"""The vLLM command line and environment for one instance of a cluster config.

Kept apart from the launcher so tests and docs can show exactly what is run without starting
anything. See docs/vllm_wire_formats.md for what these flags produce on the wire.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scheduler.config import ClusterConfig, InstanceConfig

__all__ = ["instance_dir", "server_command", "server_env"]


def server_command(cfg: ClusterConfig, inst: InstanceConfig, python: str) -> list[str]:
    """The vLLM command line for one instance."""
    kv_transfer: dict[str, object] = {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer" if inst.role == "prefill" else "kv_consumer",
        "kv_buffer_device": cfg.engine.kv_buffer_device,
    }
    if inst.role == "decode":
        # A KV pull that fails (NIXL error, producer blocks expired) makes the decode engine
        # recompute the prompt instead of ending the client's request with an error (vLLM's
        # default, "fail"). Prefill instances keep "fail": their only pulls are hot-prefix
        # migrations, whose failure the migrator must see rather than a silent recompute.
        kv_transfer["kv_load_failure_policy"] = "recompute"
    if cfg.engine.kv_lease_duration is not None:
        kv_transfer["kv_connector_extra_config"] = {
            "kv_lease_duration": cfg.engine.kv_lease_duration
        }
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(cfg.model),
        "--served-model-name", cfg.served_model_name,
        "--host", inst.host,
        "--port", str(inst.port),
        "--block-size", str(cfg.block_size),
        "--max-model-len", str(cfg.max_model_len),
        "--enable-prefix-caching",
        "--kv-transfer-config", json.dumps(kv_transfer),
    ]  # fmt: skip
    if cfg.engine.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.engine.num_gpu_blocks_override is not None:
        cmd += ["--num-gpu-blocks-override", str(cfg.engine.num_gpu_blocks_override)]
    if inst.kv_events_port is not None:
        events: dict[str, object] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            # "*" makes the server bind; subscribers connect to host:port.
            "endpoint": f"tcp://*:{inst.kv_events_port}",
            "topic": "kv-events",
        }
        if inst.kv_events_replay_port is not None:
            events["replay_endpoint"] = f"tcp://*:{inst.kv_events_replay_port}"
        cmd += ["--kv-events-config", json.dumps(events)]
    cmd += list(cfg.engine.extra_args)
    return cmd


def instance_dir(cfg: ClusterConfig, inst: InstanceConfig) -> Path:
    return cfg.run_dir / inst.name


def server_env(cfg: ClusterConfig, inst: InstanceConfig) -> dict[str, str]:
    """Environment for one server: private cache/socket dirs so servers never share files."""
    base = instance_dir(cfg, inst)
    env = dict(os.environ)
    env.update(
        VLLM_CACHE_ROOT=str(base / "vllm-cache"),
        XDG_CACHE_HOME=str(base / "cache"),
        TMPDIR=str(base / "tmp"),
        VLLM_RPC_BASE_PATH=str(base / "rpc"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        VLLM_CPU_KVCACHE_SPACE=str(cfg.engine.kv_cache_space_gib),
        VLLM_NIXL_SIDE_CHANNEL_HOST=inst.host,
        VLLM_NIXL_SIDE_CHANNEL_PORT=str(inst.nixl_side_channel_port),
        PYTHONUNBUFFERED="1",  # log lines reach server.log as they happen
    )
    if inst.cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = inst.cpus
    return env
