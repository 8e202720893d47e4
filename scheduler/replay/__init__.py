"""The benchmark client: replays a Mooncake-format trace against any OpenAI-compatible server.

Owns prompt synthesis from ``hash_ids`` (``prompts``), the open-loop replayer (``client``) and
its report (``report``: TTFT/TPOT percentiles, failures, the scheduler's own counters). It is a
client: it may import ``dualmap_pd`` (trace reading, workload preparation) and
``scheduler.config``, never the Scheduler.
"""
