"""``python -m vllm.entrypoints.openai.api_server --host H --port P ...``: the fake server."""

from __future__ import annotations

import argparse
import asyncio
import signal

from tests.fakes.openai_server import FakeOpenAIServer, FakeServerConfig


async def _serve(host: str, port: int, block_size: int) -> None:
    # With the cache model on, it also serves /metrics, as every vLLM server does.
    config = FakeServerConfig(kv_block_size=block_size)
    server = await FakeOpenAIServer(config, host=host, port=port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=16)
    args, _engine_flags = parser.parse_known_args()  # the real engine's flags mean nothing here
    asyncio.run(_serve(args.host, args.port, args.block_size))


if __name__ == "__main__":
    main()
