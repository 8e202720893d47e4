"""The vLLM command line the launcher runs: the failure-handling settings it must carry."""

from __future__ import annotations

import json

from scheduler.config import config_from_dict
from scheduler.vllm_cmd import server_command


def _config(**engine: object):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "model": "/nonexistent/m", "block_size": 16, "max_model_len": 256, "engine": engine,
        "prefill": [{"name": "p0", "port": 8701, "nixl_side_channel_port": 6001, "kv_events_port": 6002}],
        "decode": [{"name": "d0", "port": 8702, "nixl_side_channel_port": 6003}],
    })  # fmt: skip


def _kv_transfer(cmd: list[str]) -> dict[str, object]:
    return json.loads(cmd[cmd.index("--kv-transfer-config") + 1])


def test_failed_kv_pulls_are_recomputed_not_failed() -> None:
    cfg = _config()
    for inst in cfg.instances:
        kv = _kv_transfer(server_command(cfg, inst, "python"))
        # vLLM 0.32 defaults to "fail": the request would end with an error finish reason.
        assert kv["kv_load_failure_policy"] == "recompute"
        assert "kv_connector_extra_config" not in kv  # vLLM's own lease (30 s) unless configured


def test_kv_lease_can_be_shortened() -> None:
    cfg = _config(kv_lease_duration=12)
    kv = _kv_transfer(server_command(cfg, cfg.prefill[0], "python"))
    assert kv["kv_connector_extra_config"] == {"kv_lease_duration": 12}
