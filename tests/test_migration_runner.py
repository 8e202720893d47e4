"""scheduler/dispatch/migration_runner.py: plans executed through a (fake) PrefixMigrator, planner hooks,
failure handling, Prometheus families, and the Scheduler hooks (plan -> copy -> dispatch)."""

from __future__ import annotations

import asyncio

import pytest

from dualmap_pd.cost import CostModel, Link, get_profile
from dualmap_pd.hashing import block_hashes
from dualmap_pd.migration import Endpoint, MigrationError
from dualmap_pd.policies.migration import MigrationPlanner
from dualmap_pd.request import RoutedRequest
from scheduler.dispatch import migration_runner as mr
from scheduler.dispatch.migration_runner import (
    MigrationMetrics, MigrationRunner, MigrationRunnerOptions, PromptMemory, build_migrator,
)  # fmt: skip
from tests.fakes.migrator import FakeMigrator
from tests.policy_helpers import make_view
from tests.service_harness import ByteTokenizer, cluster, run

BS = 16


def request(rid: str, ids: list[int]) -> RoutedRequest:
    return RoutedRequest(rid, len(ids), block_hashes(ids, BS), BS, 0.0)


class Rig:
    """A view with the prefix on p0, a planner with one plan to p1, and a runner around it."""

    def __init__(self, migrator: FakeMigrator, timeout_s: float = 5.0, healthy: bool = True) -> None:
        self.view = make_view(2, block_size=BS)
        self.planner = MigrationPlanner(CostModel(get_profile("qwen7b-910b4")))
        self.prompt = list(range(100, 100 + 10 * BS + 5))  # 10 full blocks and a tail
        self.req = request("r1", self.prompt)
        self.view.add_blocks("p0", self.req.block_hashes)
        plan = self.planner.propose(self.req, "p1", self.view, 0.0)
        assert plan is not None
        self.plan = plan
        self.planner.on_planned(plan, 0.0)
        self.settled = 0
        self.metrics = MigrationMetrics(self.planner, self.view)
        self.migrator = migrator
        migrator.on_landed = lambda target, tokens: self.view.add_blocks(target, block_hashes(tokens, BS))
        self.runner = MigrationRunner(
            self.planner, migrator, lambda n: Endpoint(n, f"http://{n}"), self.on_settled, self.metrics,
            options=MigrationRunnerOptions("fake", timeout_s), healthy=lambda n: healthy,
        )  # fmt: skip
        self.runner.remember(self.req, self.prompt)

    def on_settled(self) -> None:
        self.settled += 1

    async def execute(self) -> None:
        self.runner.submit([self.plan])
        while self.runner.running:
            await asyncio.sleep(0.001)


def test_a_plan_is_copied_and_reported_finished() -> None:
    async def body() -> None:
        rig = Rig(FakeMigrator())
        await rig.execute()
        (tokens, src, dst), = rig.migrator.calls
        assert (src, dst) == ("p0", "p1") and tokens == rig.prompt[: 10 * BS]
        assert rig.planner.stats.finished == 1 and rig.planner.in_flight() == []
        assert rig.planner.stats.bytes_moved == 10 * BS * 1000
        assert rig.metrics.finished.value(("p0", "p1")) == 1 and rig.metrics.bytes.value(("p0", "p1")) == 160_000
        assert rig.settled >= 1
        # The target's (fake) KV events indexed the copy; hits on it are counted as migrated.
        assert rig.view.hit_blocks("p1", rig.req.block_hashes) == 10
        follower = request("r2", rig.prompt[: 10 * BS] + [7] * 40)
        rig.runner.note_prefill(follower, "p1", 10 * BS)
        assert rig.metrics.migrated_hits.value(("p1",)) == 10 * BS
        names = {m.name for m in rig.metrics.collect()}
        assert {"dualmap_migrations_started", "dualmap_migration_prefixes_replicated",
                "dualmap_migration_bytes_in_flight", "dualmap_migration_seconds"} <= names  # fmt: skip
        replicated = next(m for m in rig.metrics.collect() if m.name == "dualmap_migration_prefixes_replicated")
        assert [(s.labels["instance"], s.value) for s in replicated.samples] == [("p1", 1.0)]

    run(body)


@pytest.mark.parametrize(
    ("outcome", "reason"), [("fail", "connect"), ("raise", "error"), ("hang", "timeout")]
)
def test_failed_copies_are_counted_and_release_their_requests(outcome: str, reason: str) -> None:
    async def body() -> None:
        m = FakeMigrator()
        m.outcome = outcome
        rig = Rig(m, timeout_s=0.05)
        await rig.execute()
        assert rig.planner.stats.failed == 1 and rig.planner.stats.failures[reason] == 1
        assert rig.planner.bytes_in_flight == 0 and rig.planner.in_flight() == []
        assert rig.metrics.failed.value(("p0", "p1", reason)) == 1
        assert rig.settled >= 1  # the scheduler dispatches: held requests recompute
        assert rig.view.hit_blocks("p1", rig.req.block_hashes) == 0

    run(body)


def test_no_prompt_or_no_instance_fails_without_calling_the_backend() -> None:
    async def body() -> None:
        rig = Rig(FakeMigrator())
        rig.runner.prompts = PromptMemory(4)  # forgot the prompt
        await rig.execute()
        assert rig.planner.stats.failures["prefix_tokens_unknown"] == 1 and rig.migrator.calls == []
        down = Rig(FakeMigrator(), healthy=False)
        await down.execute()
        assert down.planner.stats.failures["instance_unavailable"] == 1 and down.migrator.calls == []

    run(body)


def test_stop_cancels_running_copies_and_closes_the_backend() -> None:
    async def body() -> None:
        m = FakeMigrator()
        m.outcome = "hang"
        rig = Rig(m, timeout_s=60)
        rig.runner.submit([rig.plan])
        await asyncio.sleep(0.01)
        await rig.runner.stop()
        assert m.cancelled == 1 and m.closed and rig.runner.running == 0
        assert rig.planner.stats.failures["cancelled"] == 1

    run(body)


def test_prompt_memory_is_bounded_and_cuts_the_prefix() -> None:
    mem = PromptMemory(2)
    for i in range(3):
        mem.remember(f"r{i}", list(range(i, i + 40)))
    assert len(mem) == 2
    rig_plan = type("P", (), {"request_id": "r2", "prefix_tokens": 32})()
    assert mem.prefix(rig_plan) == list(range(2, 34))  # type: ignore[arg-type]
    gone = type("P", (), {"request_id": "r0", "prefix_tokens": 32})()
    assert mem.prefix(gone) is None  # type: ignore[arg-type]


def test_unknown_or_unusable_backend_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MigrationError, match="unknown migration backend"):
        build_migrator("no-such-backend", "m", 16, 5.0)
    assert MigrationRunnerOptions("off").enabled is False and MigrationRunnerOptions("nixl").enabled


# -- inside the Scheduler ---------------------------------------------------------------------
def test_scheduler_without_backend_plans_nothing() -> None:
    async def body() -> None:
        async with cluster(prefill_policy="dualmap") as h:
            assert h.scheduler.migrations is None and h.scheduler.prefill_policy.migration is None

    run(body)


def test_scheduler_runs_the_rebalancers_plans_and_dispatches_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefix held only by an overloaded prefill instance: the next request with it is sent to
    the other candidate, the prefix is copied there first, then the request goes."""
    monkeypatch.setattr(mr, "load_migrator_class", lambda name: FakeMigrator)

    async def body() -> None:
        async with cluster(prefill_policy="dualmap", migration_backend="fake") as h:
            s = h.scheduler
            assert s.migrations is not None and s.prefill_policy.migration is not None
            fake: FakeMigrator = s.migrations.migrator  # type: ignore[assignment]
            pol = s.prefill_policy
            # The modelled copy (10 ms of link latency) outlasts the real one (5 ms): the
            # request waits for it rather than recomputing.
            pol.migration.link = Link(25e9, 0.01)  # type: ignore[union-attr]
            fake.delay_s = 0.005
            fake.on_landed = lambda target, tokens: s.view.add_blocks(target, block_hashes(tokens, s.view.block_size))
            prompt = ByteTokenizer().encode_text("x" * 200, add_special_tokens=True)
            first = s.new_request(prompt, 4, 0.0)
            _, (a, b) = pol.candidates_for(first)  # type: ignore[attr-defined]
            s.view.add_blocks(a, first.block_hashes)
            s.view[a].engine_pending_tokens = 10**6  # a is far over the SLO
            got = await asyncio.wait_for(s.acquire_prefill(first), 5)
            assert got == b
            (tokens, src, dst), = fake.calls
            assert (src, dst) == (a, b) and tokens == prompt[: len(first.block_hashes) * s.view.block_size]
            assert pol.migration.stats.finished == 1  # type: ignore[union-attr]
            assert s.view.hit_blocks(b, first.block_hashes) == len(first.block_hashes)
            s.complete_prefill(first, b, 0.01, len(first.block_hashes) * s.view.block_size, None)
            text = s.metrics.render().decode()
            assert f'dualmap_migrations_finished_total{{source="{a}",target="{b}"}} 1.0' in text
            assert "dualmap_migrated_hit_tokens_total" in text

    run(body)
