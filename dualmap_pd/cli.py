"""``dualmap-pd``: the simulator's commands plus subcommands contributed by plugins.

Built in: ``sim`` (one simulation) and ``capacity`` (effective-capacity search per policy). Other
packages add subcommands through the entry-point group ``dualmap_pd.commands``: each entry point
is a function ``register(subparsers)`` that adds one subparser with ``func=handler`` (handler
``(args) -> exit code``). Plugins are imported only when the command line is not a built-in
command, and a plugin that fails to import is skipped; its command then prints a one-line note.

Exit codes: 0 success, 1 the run failed, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from dualmap_pd.sim.config import CAPACITY_EXCLUDED, CapacitySearch, ConfigError, SimConfig
from dualmap_pd.sim.dataclass_args import add_dataclass_arguments, dataclass_from_args

if TYPE_CHECKING:
    from dualmap_pd.sim.workload import PreparedTrace

PLUGIN_GROUP = "dualmap_pd.commands"
BUILTIN_COMMANDS = ("sim", "capacity")
PROGRESS_INTERVAL_S = 2.0


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: message``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class StderrProgress:
    """Progress lines on stderr, only for runs that last more than a couple of seconds."""

    def __init__(self, label: str, stream: TextIO | None = None, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int, sim_time: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            print(
                f"{self.label}: {done}/{total} requests done, simulated {sim_time:.0f} s, "
                f"{now - self.started:.0f} s elapsed",
                file=self.stream,
                flush=True,
            )


# -- parser ----------------------------------------------------------------------------------------
def build_parser(load_plugins: bool = True) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The full parser, and the plugin commands that failed to import (name -> reason)."""
    parser = OneLineParser(prog="dualmap-pd", description="DualMap routing for P/D-disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sim = sub.add_parser(
        "sim",
        help="simulate one policy on a trace",
        description="Trace-driven simulation of one prefill policy (colocated or disaggregated).",
    )
    add_dataclass_arguments(sim, SimConfig)
    sim.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    sim.set_defaults(func=_run_sim)
    cap = sub.add_parser(
        "capacity",
        help="effective capacity (highest QPS meeting the SLO) per policy",
        description="For each policy, search the highest arrival rate at which at least --target "
        "of requests meet the TTFT SLO (each probe is a full simulation).",
    )
    add_dataclass_arguments(cap, SimConfig, exclude=CAPACITY_EXCLUDED)
    add_dataclass_arguments(cap, CapacitySearch)
    cap.add_argument("--jobs", type=int, default=1, help="policies searched in parallel processes (default: 1)")
    cap.add_argument("--json", action="store_true", help="print one JSON object keyed by policy")
    cap.add_argument("--plot", metavar="FILE.png", help="draw SLO attainment vs arrival rate")
    cap.set_defaults(func=_run_capacity)
    failed = _add_plugins(sub) if load_plugins else {}
    return parser, failed


def _add_plugins(sub: Any) -> dict[str, str]:
    failed: dict[str, str] = {}
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in BUILTIN_COMMANDS:
            continue
        try:
            register = ep.load()
            register(sub)
        except Exception as exc:  # any import/registration failure: skip, say why if invoked
            failed[ep.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            sub.add_parser(ep.name, help="(unavailable: its package failed to import)", add_help=False)
    return failed


def _first_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


# -- commands --------------------------------------------------------------------------------------
def _load_trace(cfg: SimConfig) -> PreparedTrace:
    from dualmap_pd.sim.workload import load_prepared
    from dualmap_pd.trace import TraceError

    began = time.monotonic()
    try:
        trace = load_prepared(cfg.trace, cfg.requests, cfg.tile)
        trace.block_hashes(cfg.hardware.block_size)
    except (TraceError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if time.monotonic() - began > PROGRESS_INTERVAL_S:
        print(f"prepared {len(trace)} requests in {time.monotonic() - began:.1f} s", file=sys.stderr)
    return trace


def _run_sim(args: argparse.Namespace) -> int:
    from dualmap_pd.sim.simulator import Simulator

    cfg = dataclass_from_args(SimConfig, args).validate()
    trace = _load_trace(cfg)
    result = Simulator(cfg, trace, StderrProgress(f"sim {cfg.policy}")).run()
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def _run_capacity(args: argparse.Namespace) -> int:
    from dualmap_pd.sim.sweep import CapacityJob, run_capacity_jobs

    search = dataclass_from_args(CapacitySearch, args).validate()
    names = search.policy_names()
    base = dataclass_from_args(SimConfig, args, policy=names[0])
    for name in names:
        base.with_(policy=name).validate()
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.plot:
        from dualmap_pd.sim.plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            raise UsageError(str(exc)) from None
    trace = _load_trace(base)
    jobs = [CapacityJob(name, base.with_(policy=name), search, verbose=True) for name in names]
    results = run_capacity_jobs(jobs, trace, workers=args.jobs)
    if args.plot:
        from dualmap_pd.sim.plot import plot_attainment

        title = f"{base.mode}, {base.prefill} prefill, SLO {base.slo_ttft:g} s, {base.profile}"
        print(f"plot written to {plot_attainment(results, args.plot, search.target, title)}", file=sys.stderr)
    if args.json:
        print(json.dumps({name: res.to_json() for name, res in results.items()}))
    else:
        print(f"{'policy':<20}{'capacity qps':>14}{'SLO att.':>10}{'hit ratio':>11}{'probes':>8}")
        for name, res in results.items():
            att = "-" if res.slo_attainment_at_capacity is None else f"{res.slo_attainment_at_capacity:.1%}"
            hit = "-" if res.cache_hit_ratio is None else f"{res.cache_hit_ratio:.1%}"
            print(f"{name:<20}{res.capacity_qps:>14.3f}{att:>10}{hit:>11}{len(res.points):>8}")
    return 0


def format_summary(s: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [
        f"{s['policy']} ({s['mode']}, {s['prefill_instances']} prefill"
        + (f" + {s['decode_instances']} decode" if s["decode_instances"] else "")
        + f", {s['profile']}) at {s['offered_qps']:.3f} req/s",
        f"requests {s['requests']} (completed {s['completed']}, warm-up {s['warmup']}, measured {s['measured_requests']})",
        *([s["workload"]["description"]] if s.get("workload") else []),
        f"TTFT ms  p50 {ms(s['ttft_p50'])}  p90 {ms(s['ttft_p90'])}  p99 {ms(s['ttft_p99'])}   "
        f"TPOT ms  p50 {ms(s['tpot_p50'])}  p90 {ms(s['tpot_p90'])}",
        f"SLO ({s['slo_ttft']:g} s) attainment {s['slo_attainment']:.1%}   cache hit {s['cache_hit_ratio']:.1%}   "
        f"load CV {s['load_cv']:.3f}   KV moved {s['kv_bytes_moved'] / 1e9:.1f} GB",
        "decisions: " + ", ".join(f"{k} {v}" for k, v in s["decisions"].items()),
    ]
    m = s.get("migrations")
    if m:
        lines.append(
            f"migrations: started {m['started']}, finished {m['finished']}, failed {m['failed']}, "
            f"{m['bytes_moved'] / 1e9:.1f} GB moved; {s['migrated_hit_tokens']} prompt tokens served from migrated blocks"
        )
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Built-in commands never import plugins (fast, and immune to a broken plugin).
    builtin = _first_command(argv) in BUILTIN_COMMANDS
    parser, failed = build_parser(load_plugins=not builtin)
    command = _first_command(argv)
    if command in failed:  # before parsing: the broken plugin's own options are unknown here
        print(f"dualmap-pd: command {command!r} is unavailable ({failed[command]})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if args.command is None or func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"dualmap-pd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualmap-pd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
