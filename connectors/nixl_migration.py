"""Hot-prefix KV migration between two prefill servers over NIXL, with vLLM's own NixlConnector.

No engine change is needed. Both servers run the NixlConnector as ``kv_producer`` (in vLLM 0.32
whether an engine pulls is decided per request, by the request's ``kv_transfer_params``):

1. the source gets the prefix as a token-id prompt (one token longer when it is block-aligned,
   see ``migrate``) with ``max_tokens=1`` and
   ``kv_transfer_params: {"do_remote_decode": true}``. It holds the prefix in its prefix cache,
   so this costs about one token of compute; it answers with ``kv_transfer_params`` (its NIXL
   engine id, side-channel host/port, the block ids) and pins those blocks for the reader;
2. the target gets the same prompt with those ``kv_transfer_params`` unchanged. Its scheduler
   pulls the blocks it does not already hold over NIXL (a full local hit moves only the tail),
   puts the full 128-token blocks into its prefix cache and publishes BlockStored for them; the
   partial last block is moved but not cached. It then computes one token and answers.

Later requests with that prefix hit the target's own cache (``vllm:prefix_cache_hits_total``).

Pinning: the source keeps the blocks until the target has read them or until
``kv_lease_duration`` (``kv_connector_extra_config``, 30 s by default) passes without the reader's
heartbeat. So a migration that fails after step 1 (target down, target request rejected, timed
out) leaves the blocks pinned for at most one lease: they are then freed and counted in the
source's ``vllm:nixl_num_kv_expired_reqs``. A target request that we abort (timeout closes the
connection) makes the target tell the source to free them at once; a source request we abort
frees them on the source directly. Nothing is pinned forever.

Bytes moved come from the target's ``vllm:nixl_bytes_transferred`` histogram (sum and count),
scraped before and after. That is exact when the count moved by one transfer; other pulls on the
target at the same time (P/D handoffs, other migrations) make the delta ambiguous, and then the
result falls back to an estimate from the model's KV shape (every block of the prefix, the partial
last one included, i.e. an upper bound for a target that already held part of it). The result's
``bytes_source`` says which one it is.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from connectors import KVSize
from connectors.http_session import LazySession
from dualmap_pd.migration import Endpoint, MigrationResult

# Histogram/counter families of vLLM 0.32's NIXL stats (vllm/.../nixl/stats.py); summed over
# the engine label so data-parallel servers count once.
_BYTES_SUM = "vllm:nixl_bytes_transferred_sum"
_BYTES_COUNT = "vllm:nixl_bytes_transferred_count"
_XFER_SECONDS_SUM = "vllm:nixl_xfer_time_seconds_sum"
_FAILED = "vllm:nixl_num_failed_transfers_total"
_WANTED = (_BYTES_SUM, _BYTES_COUNT, _XFER_SECONDS_SUM, _FAILED)


@dataclass(frozen=True, slots=True)
class NixlCounters:
    """The target's cumulative NIXL counters at one moment."""

    bytes: float = 0.0
    transfers: float = 0.0
    xfer_seconds: float = 0.0
    failed: float = 0.0


def parse_nixl_counters(text: str) -> NixlCounters | None:
    """NIXL counters from a Prometheus text body; None if the server exports none (no NIXL)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:nixl_"):
            continue
        name, _, rest = line.partition("{")
        if name not in _WANTED:
            name = line.split(" ", 1)[0]
            if name not in _WANTED:
                continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        totals[name] = totals.get(name, 0.0) + value
    if _BYTES_SUM not in totals:
        return None
    return NixlCounters(
        bytes=totals.get(_BYTES_SUM, 0.0),
        transfers=totals.get(_BYTES_COUNT, 0.0),
        xfer_seconds=totals.get(_XFER_SECONDS_SUM, 0.0),
        failed=totals.get(_FAILED, 0.0),
    )


@dataclass(frozen=True)
class NixlMigrationResult(MigrationResult):
    """A MigrationResult with what the NIXL path can also tell."""

    # "metrics": the target's nixl byte counter moved by exactly our transfer; "estimate": blocks
    # x bytes per block from the model's KV shape (an upper bound); "unknown": neither available.
    bytes_source: str = "unknown"
    source_seconds: float = 0.0  # source leg (prefill with do_remote_decode), wall time
    target_seconds: float = 0.0  # target leg (NIXL pull + one token), wall time
    nixl_seconds: float | None = None  # in-engine NIXL transfer time on the target (metrics)
    source_cached_tokens: int | None = None  # prefix tokens the source already had cached
    first_token_match: bool | None = None  # target's first token == source's (greedy check)
    note: str | None = None


class _LegError(Exception):
    """One HTTP leg of a migration failed; the message is ready for MigrationResult.error."""


def _base_url(url: str) -> str:
    """Endpoint URLs may be given with or without the OpenAI ``/v1`` suffix."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class NixlPrefixMigrator:
    """Copies a prefix's KV blocks from one prefill server to another over vLLM's NixlConnector.

    ``model`` is the served model name the requests carry. ``timeout`` bounds a whole migration
    (both legs); ``connect_timeout`` makes a dead server fail fast. ``kv_size`` (from
    :func:`connectors.kv_size_from_model_dir`) enables the byte estimate when the metrics cannot
    attribute bytes. Pass a ``session`` to share a connection pool; it is then not closed here.
    """

    def __init__(
        self,
        model: str,
        *,
        block_size: int = 128,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        kv_size: KVSize | None = None,
        session: aiohttp.ClientSession | None = None,
        scrape_metrics: bool = True,
        metrics_settle: float = 1.0,
    ) -> None:
        if not model:
            raise ValueError("model (the served model name) is required")
        if block_size <= 0 or timeout <= 0 or connect_timeout <= 0:
            raise ValueError("block_size, timeout and connect_timeout must be positive")
        self.model = model
        self.block_size = block_size
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.kv_size = kv_size
        self.scrape_metrics = scrape_metrics
        self.metrics_settle = metrics_settle
        self._http = LazySession(session)

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> NixlPrefixMigrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        return self._http.get()

    # ------------------------------------------------------------------ the migration

    async def migrate(
        self, prefix_tokens: Sequence[int], source: Endpoint, target: Endpoint
    ) -> NixlMigrationResult:
        tokens = [int(t) for t in prefix_tokens]
        if not tokens:
            raise ValueError("prefix_tokens is empty")
        if _base_url(source.url) == _base_url(target.url):
            raise ValueError(f"source and target are the same server ({source.url})")
        n = len(tokens)
        blocks = n // self.block_size  # full blocks: what the target's prefix cache keeps
        deadline = time.monotonic() + self.timeout

        def failed(error: str, t0: float, **kw: Any) -> NixlMigrationResult:
            return NixlMigrationResult(
                ok=False, source=source.name, target=target.name, prefix_tokens=n, blocks=0,
                bytes_moved=0, seconds=time.perf_counter() - t0, error=error, **kw,
            )  # fmt: skip

        # vLLM never serves a whole prompt from cache: a hit is capped at len - 1 tokens, so a
        # block-aligned prompt would make the source recompute its last block, and the target
        # would cache that recomputed copy (numerically a little different from the source's
        # cached block; measured: greedy logprobs then differ). One extra token keeps every
        # prefix block a hit on the source, and the target caches bit-identical copies of them.
        # The extra token only lands in the partial block, which the target does not cache.
        prompt = tokens + [tokens[-1]] if n % self.block_size == 0 else tokens
        before = await self._counters(target) if self.scrape_metrics else None
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,  # token ids: no re-tokenization, exactly the cached blocks
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
        }
        t0 = time.perf_counter()
        try:
            src = await self._complete(
                source, "source", {**body, "kv_transfer_params": {"do_remote_decode": True}}, deadline
            )
        except _LegError as exc:
            return failed(str(exc), t0)
        t1 = time.perf_counter()
        params = src.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("remote_block_ids"):
            return failed(
                f"source {source.name} returned no kv_transfer_params "
                "(is it running vLLM's NixlConnector with enable_prefix_caching?)",
                t0, source_seconds=t1 - t0,
            )  # fmt: skip
        cached = params.get("remote_prefill_cached_tokens")
        source_cached = int(cached) if isinstance(cached, (int, float)) else None
        try:
            pull = {**body, "kv_transfer_params": params}  # unchanged, as vLLM's P/D proxy does
            tgt = await self._complete(target, "target", pull, deadline)
        except _LegError as exc:
            error = str(exc)
            now = await self._counters(target) if before is not None else None
            if now is not None and before is not None and now.failed > before.failed:
                # Measured: a source killed between the legs makes the target's pull fail
                # (NIXL_ERR_REMOTE_DISCONNECT) and the target answer HTTP 500 at once.
                error += "; the target counted a failed NIXL transfer (source gone?)"
            else:
                error += "; the source pins the prefix's blocks until kv_lease_duration expires"
            return failed(error, t0, source_seconds=t1 - t0, source_cached_tokens=source_cached)
        t2 = time.perf_counter()

        after = await self._settled_counters(target, before)
        bytes_moved, bytes_source, nixl_seconds, note = self._attribute_bytes(
            len(prompt), before, after
        )
        if source_cached is not None and source_cached < blocks * self.block_size:
            # The source had evicted (part of) the prefix and recomputed it: still a valid copy,
            # but not the cheap one the planner assumed.
            extra = f"source had only {source_cached} of {n} tokens cached and recomputed the rest"
            note = f"{note}; {extra}" if note else extra
        return NixlMigrationResult(
            ok=True, source=source.name, target=target.name, prefix_tokens=n, blocks=blocks,
            bytes_moved=bytes_moved, seconds=t2 - t0, bytes_source=bytes_source,
            source_seconds=t1 - t0, target_seconds=t2 - t1, nixl_seconds=nixl_seconds,
            source_cached_tokens=source_cached,
            first_token_match=_first_text(src) == _first_text(tgt), note=note,
        )  # fmt: skip

    def _attribute_bytes(
        self, n: int, before: NixlCounters | None, after: NixlCounters | None
    ) -> tuple[int, str, float | None, str | None]:
        """(bytes, bytes_source, nixl seconds, note) from the counter delta, else the estimate."""
        estimate = self.kv_size.transfer_bytes(n, self.block_size) if self.kv_size else None
        note: str | None = None
        if before is not None and after is not None:
            transfers = round(after.transfers - before.transfers)
            if after.failed > before.failed:
                note = "the target counted a failed NIXL transfer meanwhile (ours or another)"
            if transfers == 1:
                return (round(after.bytes - before.bytes), "metrics",
                        after.xfer_seconds - before.xfer_seconds, note)  # fmt: skip
            why = (
                f"{transfers} NIXL transfers on the target meanwhile"
                if transfers > 1
                else "the target's NIXL counters did not move"
            )
            note = f"{why}: bytes not attributable" + (f"; {note}" if note else "")
        elif self.scrape_metrics:
            note = "the target's /metrics had no NIXL counters"
        if estimate is not None:
            return estimate, "estimate", None, note
        return 0, "unknown", None, note

    # ------------------------------------------------------------------ HTTP

    async def _complete(
        self, ep: Endpoint, leg: str, body: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        where = f"{leg} {ep.name} ({ep.url})"
        if remaining <= 0:
            raise _LegError(f"{where}: migration timed out after {self.timeout:g} s")
        timeout = aiohttp.ClientTimeout(total=remaining, connect=min(self.connect_timeout, remaining))
        try:
            async with self._client().post(
                f"{_base_url(ep.url)}/v1/completions", json=body, timeout=timeout
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise _LegError(f"{where}: HTTP {resp.status}: {_error_message(text)}")
        except asyncio.TimeoutError:
            raise _LegError(f"{where}: timed out (migration budget {self.timeout:g} s)") from None
        except aiohttp.ClientError as exc:
            raise _LegError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise _LegError(f"{where}: answer is not JSON: {text[:200]!r}") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices:
            raise _LegError(f"{where}: answer has no choices: {text[:200]!r}")
        finish = choices[0].get("finish_reason")
        if finish not in ("length", "stop"):
            # vLLM reports a failed KV load (policy "fail") as finish_reason "error".
            raise _LegError(f"{where}: request finished with {finish!r}")
        return answer

    async def _counters(self, ep: Endpoint) -> NixlCounters | None:
        """The server's NIXL counters, or None (no NIXL metrics, or /metrics unreachable)."""
        timeout = aiohttp.ClientTimeout(total=self.connect_timeout)
        try:
            async with self._client().get(f"{_base_url(ep.url)}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                return parse_nixl_counters(await resp.text())
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return None

    async def _settled_counters(
        self, ep: Endpoint, before: NixlCounters | None
    ) -> NixlCounters | None:
        """Counters after our pull. The engine reports transfer stats with its step outputs, so
        they normally show up by the time the answer does; poll briefly in case they lag."""
        if before is None:
            return None
        give_up = time.monotonic() + self.metrics_settle
        while True:
            after = await self._counters(ep)
            if after is None or after.transfers > before.transfers or time.monotonic() >= give_up:
                return after
            await asyncio.sleep(0.05)


def _first_text(answer: dict[str, Any]) -> str | None:
    try:
        return str(answer["choices"][0]["text"])
    except (KeyError, IndexError, TypeError):
        return None


def _error_message(text: str) -> str:
    """vLLM's OpenAI error body is {"error": {"message": ...}} (older: {"message": ...})."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return text[:300]

