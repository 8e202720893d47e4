"""The emulated vLLM engine server (scheduler/emulator/server.py) under the names the tests use.

``FakeOpenAIServer`` is ``EngineServer`` in fixed-delay mode: configurable latency, generated
tokens and per-request faults (``FakeServerConfig.fault_for``), vLLM's streaming wire format,
NixlConnector ``kv_transfer_params`` for P/D, and with ``kv_block_size`` the engine's prefix-cache
bookkeeping and ``/metrics``. Use ``async with FakeOpenAIServer(config) as server:`` inside a
running loop, or ``with serve_in_thread(config) as server:`` from synchronous code.
"""

from scheduler.emulator.server import (  # noqa: F401 - re-exported for the tests
    FAULT_KINDS,
    Fault,
    fault_by_max_tokens,
    serve_in_thread,
)
from scheduler.emulator.server import EngineServer as FakeOpenAIServer  # noqa: F401
from scheduler.emulator.server import ServerConfig as FakeServerConfig  # noqa: F401
