"""``dualmap-pd serve``: the live OpenAI-compatible scheduler for a cluster config.

Only argparse is imported at module level, so ``dualmap-pd --help`` stays fast; the service,
transformers and uvloop load when the command runs. Also runnable standalone:
``python -m scheduler.serve --config scripts/cluster.local.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.config import ClusterConfig, SchedulerOptions
    from scheduler.http.auth import ApiKeyGuard

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="cluster YAML (see scripts/cluster.local.yaml)")
    parser.add_argument("--host", help="listen address (default: scheduler.host of the config)")
    parser.add_argument("--port", type=int, help="listen port (default: scheduler.port)")
    parser.add_argument("--policy", help="prefill policy (default: scheduler.policy)")
    parser.add_argument("--decode-policy", default="power_of_two", help="decode policy")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (default: config)")
    parser.add_argument("--profile", default="qwen7b-910b4",
                        help="cost profile (per-token cost is recalibrated online)")  # fmt: skip
    parser.add_argument("--max-engine-pending", type=int, default=2,
                        help="late dispatch: prefills an engine may hold at once")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                        help="larger request bodies get 413")  # fmt: skip
    parser.add_argument("--api-keys-file", metavar="PATH",
                        help="client API keys, one per line (default: scheduler.api_keys_file of the "
                             "config; also DUALMAP_API_KEYS, comma-separated); none: the /v1 API is open")  # fmt: skip
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="seconds to connect to an engine before it counts as down")  # fmt: skip
    parser.add_argument("--prefill-timeout", type=float, default=600.0,
                        help="seconds a prefill leg may take before the client gets 504")  # fmt: skip
    parser.add_argument("--decode-idle-timeout", type=float, default=600.0,
                        help="longest silence between two decode chunks before the request ends")  # fmt: skip
    parser.add_argument("--health-interval", type=float, default=2.0,
                        help="seconds between active /health probes of every engine")  # fmt: skip
    parser.add_argument("--migration", default="off", metavar="BACKEND",
                        help="hot-prefix KV migration between prefill instances: a backend of the "
                             "dualmap_pd.migrators entry points (nixl, lmcache) or off; the policy "
                             "'dualmap' plans copies only when a backend runs them")  # fmt: skip
    parser.add_argument("--migration-timeout", type=float, default=30.0,
                        help="seconds before a prefix migration counts as failed")  # fmt: skip
    parser.add_argument("--no-kv-events", action="store_true",
                        help="do not subscribe to the prefill engines' KV events")  # fmt: skip
    parser.add_argument("--no-engine-metrics", action="store_true",
                        help="do not poll the engines' /metrics")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="scheduler processes sharing the port (SO_REUSEPORT), each a replica "
                             "with its own intake and queues (docs/replicas.md)")  # fmt: skip
    parser.add_argument("--log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from dualmap_pd.policies import DECODE_POLICIES, PREFILL_POLICIES

    from scheduler.http.admin import AdminGuard
    from scheduler.config import ConfigError, SchedulerOptions, load_config
    from scheduler.http.auth import ApiKeyError, ApiKeyGuard

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            cfg = cfg.with_overrides(scheduler=overrides)
        options = SchedulerOptions.from_config(
            cfg,
            prefill_policy=args.policy,
            decode_policy=args.decode_policy,
            slo_ttft=args.slo_ttft,
            cost_profile=args.profile,
            max_engine_pending=args.max_engine_pending,
            max_body_bytes=args.max_body_bytes,
            connect_timeout_s=args.connect_timeout,
            prefill_timeout_s=args.prefill_timeout,
            decode_idle_timeout_s=args.decode_idle_timeout,
            health_interval_s=args.health_interval,
            migration_backend=args.migration,
            migration_timeout_s=args.migration_timeout,
            workers=args.workers,
        )
        timeouts = (args.connect_timeout, args.prefill_timeout, args.decode_idle_timeout, args.health_interval)
        if min(timeouts) <= 0:
            raise ValueError("timeouts and --health-interval must be positive")
        keys_file = args.api_keys_file
        if keys_file is None and cfg.scheduler.api_keys_file is not None:
            base = cfg.source.parent if cfg.source is not None else Path.cwd()
            keys_file = base / cfg.scheduler.api_keys_file
        api_keys = ApiKeyGuard.from_sources(os.environ, keys_file)
        AdminGuard.from_config(cfg.admin.token, os.environ)  # a bad admin token fails here, not later
        PREFILL_POLICIES.get(options.prefill_policy)
        DECODE_POLICIES.get(options.decode_policy)
        if options.max_engine_pending < 1 or options.max_body_bytes < 1 or options.slo_ttft <= 0:
            raise ValueError("--max-engine-pending, --max-body-bytes and --slo-ttft must be positive")
        if options.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {options.workers}")
    except (ConfigError, ValueError, ApiKeyError) as exc:
        print(f"dualmap-pd serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if options.workers == 1:
        return _serve_process(cfg, options, api_keys, args, worker=None)
    from scheduler.workers import run_workers

    print(f"dualmap-pd serve: {options.workers} workers on port {cfg.scheduler.port}", flush=True)
    return run_workers(options.workers, lambda index: _serve_process(cfg, options, api_keys, args, worker=index))


def _serve_process(cfg: ClusterConfig, options: SchedulerOptions, api_keys: ApiKeyGuard,
                   args: argparse.Namespace, worker: int | None) -> int:  # fmt: skip
    """One scheduler: the whole service, or one of ``--workers`` replicas sharing the port."""
    import asyncio
    import signal

    from dualmap_pd.migration import MigrationError
    from scheduler.dispatch.tokenization import HFPromptTokenizer
    from scheduler.http.app import serve_forever
    from scheduler.service import Scheduler, default_intake

    tokenizer = HFPromptTokenizer(cfg.model)
    intake = default_intake(kv_events=not args.no_kv_events, engine_metrics=not args.no_engine_metrics)
    try:
        scheduler = Scheduler(cfg, tokenizer, options=options, intake=intake)
    except MigrationError as exc:  # a backend that cannot work here says so at start-up
        print(f"dualmap-pd serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if worker in (None, 0) and not api_keys.enabled and cfg.scheduler.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dualmap-pd serve: warning: listening on {cfg.scheduler.host} with no API keys: "
              "anyone who can reach it can use the engines", file=sys.stderr)  # fmt: skip
    who = "" if worker is None else f" (worker {worker}, pid {os.getpid()})"

    def ready(port: int) -> None:
        # One write per line: workers share stdout, and print() writes the newline separately.
        sys.stdout.write(f"dualmap-pd serve: {options.prefill_policy} over {len(cfg.prefill)} prefill + "
                         f"{len(cfg.decode)} decode instances on http://{cfg.scheduler.host}:{port}{who}\n")
        sys.stdout.flush()

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await serve_forever(scheduler, cfg.scheduler.host, cfg.scheduler.port, ready, api_keys, worker)
        except asyncio.CancelledError:
            pass

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # typically: the port is taken
        print(f"dualmap-pd serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _loop_factory():  # type: ignore[no-untyped-def]
    """uvloop when installed: about twice the HTTP throughput of the default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualmap-pd serve", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
