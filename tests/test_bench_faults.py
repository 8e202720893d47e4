"""scripts/bench_faults.py end to end on stub engines (tests/fakes/vllm_stub): launch, serve,
replay, a SIGKILL, the restart, fresh requests and the JSON report; real engines in its docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.service_harness import free_ports

REPO = Path(__file__).resolve().parents[1]
VLLM_STUB = REPO / "tests" / "fakes" / "vllm_stub"


def test_bench_faults_kills_a_stub_server_and_reports_its_recovery(tmp_path: Path) -> None:
    from scheduler.local.tiny_model import build_tiny_model

    model = build_tiny_model(REPO / "models" / "tiny-llama")  # the scheduler needs its tokenizer
    ports = free_ports(11)
    raw = {
        "model": str(model), "served_model_name": "fake-model", "block_size": 16, "max_model_len": 4096,
        "run_dir": str(tmp_path / "runs"), "scheduler": {"port": ports[10]},
        "prefill": [{"name": f"prefill-{i}", "port": ports[i], "nixl_side_channel_port": ports[2 + i],
                     "kv_events_port": ports[4 + i]} for i in range(2)],
        "decode": [{"name": "decode-0", "port": ports[6], "nixl_side_channel_port": ports[7]}],
    }  # fmt: skip
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": f"{VLLM_STUB}:{REPO}"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_faults.py"), "--config", str(config),
         "--kill", "prefill-0@1", "--requests", "40", "--qps", "20", "--max-prompt-tokens", "300",
         "--max-output-tokens", "4", "--fresh", "4", "--recovery-timeout", "30", "--json"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    replay = out["replay"]
    assert replay["sent"] == 40 and replay["completed"] == 40, json.dumps(out, indent=1)
    (kill,) = out["kills"]
    assert kill["target"] == "prefill-0" and kill["error"] is None and kill["pid"]
    assert kill["healthy_again_after_s"] is not None and kill["healthy_again_after_s"] < 30
    assert out["fresh"]["completed"] == out["fresh"]["sent"] == 4, json.dumps(out, indent=1)
    assert out["servers_left_running"] == [] and out["shutdown_problems"] == []
    assert out["scheduler_requests"], out  # the scheduler's own counters were read
