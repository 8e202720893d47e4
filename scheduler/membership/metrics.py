"""Prometheus families for runtime membership: ring changes, candidate churn, draining.

A separate collector registered into the Scheduler's registry (``SchedulerMetrics.registry``),
so membership needs no edits to the request-path metrics in prom.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dualmap_pd.churn import ChurnReport
from dualmap_pd.cluster import ClusterView
from scheduler.prom import Counter


class MembershipMetrics(Collector):
    def __init__(self, view: ClusterView) -> None:
        self._view = view
        self.ring_changes = Counter(
            "dualmap_ring_changes",
            "Membership changes by pool and kind (join, leave, drain, undrain). The decode pool "
            "has no ring; its changes are counted here too.",
            ("role", "kind"),
        )
        self.prefixes_moved = Counter(
            "dualmap_ring_prefixes_moved",
            "Recently seen prefixes whose prefill candidate pair changed, summed over changes",
            ("kind",),
        )
        self.config_reloads = Counter(
            "dualmap_config_reloads", "Config-file reloads by result (applied, unchanged, error)",
            ("result",),
        )
        self.last_report = ChurnReport(0, 0)

    def ring_change(self, role: str, kind: str, report: ChurnReport | None) -> None:
        self.ring_changes.inc((role, kind))
        if report is not None:
            self.prefixes_moved.inc((kind,), report.changed)
            self.last_report = report

    def collect(self) -> Iterator[Metric]:
        for counter in (self.ring_changes, self.prefixes_moved, self.config_reloads):
            yield counter.family()
        last = self.last_report
        checked = GaugeMetricFamily(
            "dualmap_ring_last_change_prefixes_checked",
            "Recently seen prefixes compared at the last prefill membership change")
        checked.add_metric([], last.checked)
        yield checked
        fraction = GaugeMetricFamily(
            "dualmap_ring_last_change_moved_fraction",
            "Fraction of recently seen prefixes whose candidate pair changed at the last "
            "prefill membership change (about 1/n for a join or leave of one of n)")
        fraction.add_metric([], last.fraction)
        yield fraction
        draining = GaugeMetricFamily("dualmap_instance_draining",
                                     "1 if the instance is draining (takes no new work)",
                                     labels=["instance", "role"])
        for st in self._view.instances():
            draining.add_metric([st.name, st.role.value], 1.0 if st.draining else 0.0)
        yield draining
