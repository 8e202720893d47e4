"""What the scheduler learns from the engines, in the background.

Owns the KV-event subscriber that keeps each prefill instance's block index equal to the
engine's cache (``kv_events``: ZMQ, sequence gaps, replay, rebuild on restart), the ``/metrics``
poller that feeds queue and KV-usage figures into the cluster view (``engine_metrics``), and
health checks with per-instance circuit breakers (``health``). Each part writes only into the
``dualmap_pd`` cluster view or calls the callbacks it was given; it may import ``dualmap_pd``,
``scheduler.background`` and ``scheduler.prom``, never the Scheduler or the HTTP layer.
"""
