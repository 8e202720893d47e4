"""Who is in the cluster, changed at runtime.

Owns the membership registry (``registry``: add, drain, undrain, remove, with queued requests
handed to their backup candidates), ring-churn metrics (``metrics``), the watched config file
(``config_watch``), and the client side of scale-out (``admin_client``, ``scale_out``: start one
more local engine and register it through the admin API). The registry reaches the Scheduler
only through ``scheduler.ports.SchedulerCore``; it may import ``dualmap_pd``,
``scheduler.config``, ``scheduler.background``, ``scheduler.prom`` and ``scheduler.http.errors``.
"""
