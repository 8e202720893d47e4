"""``python -m vllm.entrypoints.openai.api_server --host H --port P ...``: the fake server."""

from __future__ import annotations

import argparse
import asyncio
import signal

from tests.fakes.openai_server import FakeOpenAIServer


async def _serve(host: str, port: int) -> None:
    server = await FakeOpenAIServer(host=host, port=port).start()
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
    args, _engine_flags = parser.parse_known_args()  # the real engine's flags mean nothing here
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
