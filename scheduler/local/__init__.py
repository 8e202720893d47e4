"""Running engines on this machine (or one node of a cluster): operations, not serving.

Owns the exact vLLM command line and environment for an instance (``vllm_cmd``), the launcher
that starts a config's servers (``launcher``), the supervisor that restarts one that dies
(``supervisor``: backoff, give up after repeated deaths), process-tree handling so nothing
is orphaned (``proctree``), and the deterministic tiny model the tests and quick start serve
(``tiny_model``). It may import ``scheduler.config`` and ``dualmap_pd``; nothing in the serving
path imports it.
"""
