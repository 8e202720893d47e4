"""The vLLM command line the launcher runs: the failure-handling settings it must carry."""

from __future__ import annotations

import json

import pytest

from scheduler.config import ConfigError, config_from_dict
from scheduler.local.vllm_cmd import server_command


def _config(**engine: object):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "model": "/nonexistent/m", "block_size": 16, "max_model_len": 256, "engine": engine,
        "prefill": [{"name": "p0", "port": 8701, "nixl_side_channel_port": 6001, "kv_events_port": 6002}],
        "decode": [{"name": "d0", "port": 8702, "nixl_side_channel_port": 6003}],
    })  # fmt: skip


def _kv_transfer(cmd: list[str]) -> dict[str, object]:
    return json.loads(cmd[cmd.index("--kv-transfer-config") + 1])


def test_decoders_recompute_a_failed_kv_pull_and_prefills_report_it() -> None:
    cfg = _config()
    decode = _kv_transfer(server_command(cfg, cfg.decode[0], "python"))
    # vLLM 0.32 defaults to "fail": the client's request would end with an error finish reason.
    assert decode["kv_load_failure_policy"] == "recompute"
    # A prefill instance pulls only for a migration, which must learn that its copy failed.
    prefill = _kv_transfer(server_command(cfg, cfg.prefill[0], "python"))
    assert "kv_load_failure_policy" not in prefill
    for kv in (decode, prefill):
        assert "kv_connector_extra_config" not in kv  # vLLM's own lease (30 s) unless configured


def test_kv_lease_can_be_shortened() -> None:
    cfg = _config(kv_lease_duration=12)
    kv = _kv_transfer(server_command(cfg, cfg.prefill[0], "python"))
    assert kv["kv_connector_extra_config"] == {"kv_lease_duration": 12}


def test_kv_buffer_device_is_cpu_unless_a_gpu_cluster_asks_for_cuda() -> None:
    cfg = _config()
    assert _kv_transfer(server_command(cfg, cfg.decode[0], "python"))["kv_buffer_device"] == "cpu"
    cfg = _config(kv_buffer_device="cuda")
    for inst in cfg.instances:
        assert _kv_transfer(server_command(cfg, inst, "python"))["kv_buffer_device"] == "cuda"
    with pytest.raises(ConfigError, match="engine.kv_buffer_device must be one of cpu, cuda, got 'gpu'"):
        _config(kv_buffer_device="gpu")
