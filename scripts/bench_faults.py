"""Fault benchmark: SIGKILL chosen servers during a trace replay through the scheduler.

The cluster is started the README's way: one ``dualmap-pd launch --config C.yaml`` process (which
supervises and restarts its servers) and ``dualmap-pd serve --config C.yaml`` in front (or
``--replicas N`` of them behind a small failover front, as a load balancer that retries a refused
connection on the next replica would be). A trace is replayed through it with the project's
replay client while ``--kill NAME@SECONDS`` sends SIGKILL to that server's API-server pid (as
``kill -9 PID`` would; ``scheduler-0@S`` kills a scheduler replica, which is not restarted).

Reports: requests sent, accepted (answered 200), completed, failed by kind (streams that broke
mid-answer with an error event are counted apart from lost requests), for each killed server
the time until it answered /health again and until the scheduler's circuit for it closed, the
scheduler's own request/error counters, and fresh requests after the replay (which instances
served them: killed ones must be used again). ``--json`` prints one JSON object instead.

    PYTHONPATH=. .venv/bin/python scripts/bench_faults.py --config C.yaml \\
        --kill prefill-0@12 --kill decode-0@30 --requests 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scheduler.config import ClusterConfig, load_config  # noqa: E402
from scheduler.local.launcher import STATUS_FILE  # noqa: E402
from scheduler.replay.client import ReplayOptions, replay  # noqa: E402
from scheduler.replay.report import ReplayReport  # noqa: E402

SCHEDULER = "scheduler-"  # --kill scheduler-<i>@S names a replica
# Answers that turn a request away before the scheduler took it on: no instance to serve it (503),
# or the request's own fault (4xx). Every other failure is an accepted request that was lost.
REJECTIONS = frozenset({"http_503"} | {f"http_4{n:02d}" for n in range(100)})


@dataclass
class Kill:
    target: str
    at_s: float
    done_at: float | None = None  # monotonic time of the SIGKILL
    pid: int | None = None
    healthy_after_s: float | None = None  # until its /health answered 200 again
    in_rotation_after_s: float | None = None  # until the scheduler's circuit closed again
    error: str | None = None


@dataclass
class Processes:
    launch: subprocess.Popen[bytes]
    serves: list[subprocess.Popen[bytes]] = field(default_factory=list)
    serve_urls: list[str] = field(default_factory=list)


def parse_kill(text: str) -> Kill:
    name, sep, at = text.rpartition("@")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--kill wants NAME@SECONDS, got {text!r}")
    try:
        return Kill(name, float(at))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill wants NAME@SECONDS, got {text!r}") from None


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def wait_until(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def server_status(config: ClusterConfig) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((config.run_dir / STATUS_FILE).read_text())["servers"]
    except (OSError, ValueError, KeyError):
        return {}


def circuit_states(metrics_text: str) -> dict[str, float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("dualmap_instance_circuit_state{"):
            name = line.split('instance="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def counters(metrics_text: str, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1 :].rsplit("} ", 1)
            out[labels.replace('"', "")] = float(value)
    return out


# ---------------------------------------------------------------- the cluster


def start(config_path: Path, config: ClusterConfig, replicas: int, base_port: int, log_dir: Path,
          timeout: float) -> Processes:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}:{REPO}" if pythonpath else str(REPO)}
    cli = [sys.executable, "-m", "dualmap_pd.cli"]
    launch = subprocess.Popen([*cli, "launch", "--config", str(config_path)], env=env,
                              stdout=(log_dir / "launch.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    procs = Processes(launch)
    try:
        wait_until(lambda: (config.run_dir / STATUS_FILE).is_file(), timeout, "every server healthy", launch)
        start_schedulers(procs, config_path, config, replicas, base_port, log_dir, env)
    except BaseException:
        stop(procs)
        raise
    return procs


def start_schedulers(procs: Processes, config_path: Path, config: ClusterConfig, replicas: int,
                     base_port: int, log_dir: Path, env: dict[str, str]) -> None:  # fmt: skip
    cli = [sys.executable, "-m", "dualmap_pd.cli"]
    for i in range(replicas):
        port = base_port + i
        serve = subprocess.Popen(
            [*cli, "serve", "--config", str(config_path), "--port", str(port), "--health-interval", "1"],
            env=env, stdout=(log_dir / f"serve-{i}.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.serves.append(serve)
        url = f"http://{config.scheduler.host}:{port}"
        procs.serve_urls.append(url)
        wait_until(lambda: http_get(url + "/health")[0] == 200, 120.0, f"scheduler {i} healthy", serve)


def stop(procs: Processes) -> list[str]:
    """SIGTERM the schedulers, then launch (which stops every server); returns problems seen."""
    problems = []
    for proc in [*procs.serves, procs.launch]:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} ignored SIGTERM; killed")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return problems


# ---------------------------------------------------------------- failover front (replicas)


async def failover_front(urls: list[str], port: int) -> Any:
    """A minimal load balancer: round robin over the replicas; a refused connection is retried
    on the next one (nginx's ``proxy_next_upstream error``). Streams answers through."""
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    turn = 0

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal turn
        body = await request.read()
        turn += 1
        first = turn  # ours: other requests move ``turn`` while we wait
        refused: list[str] = []
        for k in range(len(urls)):
            url = urls[(first + k) % len(urls)] + request.path_qs
            try:
                upstream = await session.request(request.method, url, data=body,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
            except aiohttp.ClientConnectorError as exc:
                refused.append(f"{url}: {exc}")
                continue
            async with upstream:
                out = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "x-dualmap-prefill-instance", "x-dualmap-decode-instance")})  # fmt: skip
                await out.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await out.write(chunk)
                except aiohttp.ClientError:
                    # The replica died mid-answer: cut the client's stream the same way.
                    request.transport.close()  # type: ignore[union-attr]
                    return out
                except ConnectionResetError:
                    return out  # the client left (replay clients hang up right after [DONE])
                try:
                    await out.write_eof()
                except ConnectionResetError:
                    pass
                return out
        return web.json_response({"error": {"message": f"no replica reachable: {refused}", "type": "server_error",
                                            "param": None, "code": "no_replica"}}, status=502)  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, session


# ---------------------------------------------------------------- the run


async def kill_at(kill: Kill, config: ClusterConfig, procs: Processes, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + kill.at_s - time.monotonic()))
    if kill.target.startswith(SCHEDULER):
        proc = procs.serves[int(kill.target[len(SCHEDULER):])]
        kill.pid = proc.pid
    else:
        entry = server_status(config).get(kill.target)
        if entry is None:
            kill.error = f"no server {kill.target} in the launch status"
            return
        kill.pid = int(entry["pid"])
    try:
        os.kill(kill.pid, signal.SIGKILL)
    except OSError as exc:
        kill.error = str(exc)
        return
    kill.done_at = time.monotonic()


async def watch_recovery(kills: list[Kill], config: ClusterConfig, sched_url: str, deadline_s: float) -> None:
    """Fill each killed server's time until /health 200 and until its circuit closed."""
    urls = {inst.name: inst.url for inst in config.instances}
    seen_open: set[str] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pending = [k for k in kills if k.target in urls and k.error is None
                   and (k.done_at is None or k.healthy_after_s is None or k.in_rotation_after_s is None)]  # fmt: skip
        if not pending and all(k.done_at is not None or k.error for k in kills):
            return
        _, text = await asyncio.to_thread(http_get, sched_url + "/metrics")
        states = circuit_states(text)
        now = time.monotonic()
        for k in pending:
            if k.done_at is None:
                continue
            name = k.target
            if states.get(name, 0.0) != 0.0:
                seen_open.add(name)
            status = server_status(config).get(name, {})
            restarted = int(status.get("pid", k.pid)) != k.pid
            if k.healthy_after_s is None and restarted:
                if (await asyncio.to_thread(http_get, urls[name] + "/health"))[0] == 200:
                    k.healthy_after_s = now - k.done_at
            if k.in_rotation_after_s is None and name in seen_open and states.get(name) == 0.0:
                k.in_rotation_after_s = now - k.done_at
        await asyncio.sleep(0.5)


async def fresh_requests(url: str, model: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` new streamed requests after the replay: status, completion, instances used."""
    import aiohttp

    rng = random.Random(seed)
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        for _ in range(n):
            prompt = [rng.randrange(10, 7900) for _ in range(rng.randrange(200, 600))]
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "stream": True, "ignore_eos": True}
            try:
                async with session.post(url + "/v1/completions", json=body) as r:
                    text = await r.text()
                    out.append({"status": r.status, "completed": r.status == 200 and "[DONE]" in text
                                and '"error"' not in text, "answer": text[-300:],
                                "prefill": r.headers.get("X-DualMap-Prefill-Instance"),
                                "decode": r.headers.get("X-DualMap-Decode-Instance")})  # fmt: skip
            except (aiohttp.ClientError, TimeoutError) as exc:
                out.append({"status": 0, "completed": False, "error": str(exc)})
    return out


def classify(report: ReplayReport) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    broken_mid_answer = rejected = 0
    for r in report.results:
        if r.failure is None:
            continue
        kinds[r.failure] += 1
        examples.setdefault(r.failure, r.error[:200])
        if r.failure in REJECTIONS:
            rejected += 1
        elif r.failure == "stream_error" and (r.ttft_s is not None):
            broken_mid_answer += 1  # tokens already streamed, then a clean error event
    sent = len(report.results)
    completed = sum(r.failure is None for r in report.results)
    accepted = sent - rejected
    return {"sent": sent, "accepted": accepted, "completed": completed,
            "failed": sent - completed, "failed_by_kind": dict(kinds), "failure_examples": examples,
            "broken_mid_answer_with_error_event": broken_mid_answer,
            "accepted_and_lost": accepted - completed - broken_mid_answer}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    log_dir = config.run_dir / "bench-faults"
    t_start = time.monotonic()
    procs = start(Path(args.config), config, args.replicas, args.scheduler_port, log_dir, args.start_timeout)
    started_s = time.monotonic() - t_start
    front = None
    url = procs.serve_urls[0]
    try:
        if args.replicas > 1:
            front = await failover_front(procs.serve_urls, args.scheduler_port + args.replicas)
            url = f"http://127.0.0.1:{args.scheduler_port + args.replicas}"
        options = ReplayOptions(
            trace=args.trace, url=url, requests=args.requests, rate_scale=args.rate_scale, qps=args.qps,
            max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
            timeout_s=args.request_timeout, ignore_eos=True, seed=args.seed,
        )  # fmt: skip
        kills: list[Kill] = list(args.kill)
        watch_url = procs.serve_urls[-1]  # a replica nobody kills (kill scheduler-0, not the last)
        t0 = time.monotonic()
        killers = [asyncio.create_task(kill_at(k, config, procs, t0)) for k in kills]
        watcher = asyncio.create_task(watch_recovery(kills, config, watch_url, args.recovery_timeout + 600))
        report = await replay(options)
        replay_s = time.monotonic() - t0
        await asyncio.gather(*killers)
        try:
            await asyncio.wait_for(asyncio.shield(watcher), args.recovery_timeout)
        except TimeoutError:
            pass
        watcher.cancel()
        fresh = await fresh_requests(url, config.served_model_name, args.fresh, args.seed + 1)
        _, metrics_text = http_get(watch_url + "/metrics")
    finally:
        if front is not None:
            runner, session = front
            await session.close()
            await runner.cleanup()
        problems = stop(procs)
    leftovers = [inst.name for inst in config.instances if http_get(inst.url + "/health", 1.0)[0]]
    return {
        "config": str(args.config), "trace": str(args.trace), "replicas": args.replicas,
        "cluster_start_s": round(started_s, 1), "replay_s": round(replay_s, 1),
        "replay": classify(report),
        "ttft_p50_s": report.summary().get("ttft_p50"),
        "kills": [{"target": k.target, "at_s": k.at_s, "pid": k.pid, "error": k.error,
                   "healthy_again_after_s": None if k.healthy_after_s is None else round(k.healthy_after_s, 1),
                   "in_rotation_again_after_s": None if k.in_rotation_after_s is None else round(k.in_rotation_after_s, 1)}
                  for k in kills],  # fmt: skip
        "fresh": {"sent": len(fresh), "completed": sum(f["completed"] for f in fresh),
                  "prefill_used": dict(Counter(f.get("prefill") for f in fresh if f.get("prefill"))),
                  "decode_used": dict(Counter(f.get("decode") for f in fresh if f.get("decode"))),
                  "failures": [f for f in fresh if not f["completed"]]},  # fmt: skip
        "scheduler_requests": counters(metrics_text, "dualmap_requests_total"),
        "scheduler_errors": counters(metrics_text, "dualmap_errors_total"),
        "engine_restarts_seen": counters(metrics_text, "dualmap_engine_restarts_total"),
        "shutdown_problems": problems, "servers_left_running": leftovers,
    }


def print_table(out: dict[str, Any]) -> None:
    r = out["replay"]
    print(f"cluster up in {out['cluster_start_s']} s; replay {out['replay_s']} s, {out['replicas']} scheduler(s)")
    print(f"requests sent {r['sent']}  accepted {r['accepted']}  completed {r['completed']}  failed {r['failed']}")
    print(f"  failed by kind: {r['failed_by_kind'] or '-'}")
    print(f"  broken mid-answer (error event after tokens): {r['broken_mid_answer_with_error_event']}  "
          f"accepted and lost: {r['accepted_and_lost']}")  # fmt: skip
    print(f"{'killed':<14}{'at s':>6}{'healthy again s':>17}{'in rotation again s':>21}")
    for k in out["kills"]:
        print(f"{k['target']:<14}{k['at_s']:>6.0f}{k['healthy_again_after_s'] or '-':>17}"
              f"{k['in_rotation_again_after_s'] or '-':>21}" + (f"  error: {k['error']}" if k["error"] else ""))
    f = out["fresh"]
    print(f"fresh requests after: {f['completed']}/{f['sent']} completed; prefill {f['prefill_used']}, "
          f"decode {f['decode_used']}")  # fmt: skip
    print(f"scheduler requests: {out['scheduler_requests']}")
    print(f"scheduler errors: {out['scheduler_errors']}")
    print(f"engine restarts seen by the scheduler: {out['engine_restarts_seen']}")
    if out["shutdown_problems"] or out["servers_left_running"]:
        print(f"shutdown: {out['shutdown_problems']} left running: {out['servers_left_running']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "scripts" / "cluster.local.yaml"))
    p.add_argument("--trace", default=str(REPO / "scripts" / "traces" / "hot_prefix_sample.jsonl"))
    p.add_argument("--kill", action="append", type=parse_kill, default=[], metavar="NAME@SECONDS",
                   help="SIGKILL this server (or scheduler-<i>) so many seconds into the replay")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rate-scale", type=float, default=None)
    p.add_argument("--qps", type=float, default=None, help="replay at this mean rate instead")
    p.add_argument("--max-prompt-tokens", type=int, default=1500)
    p.add_argument("--max-output-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--replicas", type=int, default=1, help="scheduler replicas behind a failover front")
    p.add_argument("--scheduler-port", type=int, default=None, help="first replica's port (default: the config's)")
    p.add_argument("--fresh", type=int, default=8, help="fresh requests after the replay")
    p.add_argument("--recovery-timeout", type=float, default=300.0,
                   help="how long to wait after the replay for killed servers to come back")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.scheduler_port is None:
        args.scheduler_port = load_config(args.config).scheduler.port
    for k in args.kill:
        if k.target.startswith(SCHEDULER) and (args.replicas < 2 or int(k.target[len(SCHEDULER):]) >= args.replicas - 1):
            p.error("--kill scheduler-<i> needs --replicas >= 2 and i < replicas-1 (the last one watches)")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
