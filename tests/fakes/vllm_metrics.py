"""The emulator's vLLM ``/metrics`` rendering under the names the tests use (scheduler/emulator/metrics.py)."""

from scheduler.emulator.metrics import (  # noqa: F401 - re-exported for the tests
    CONTENT_TYPE,
    LABELS,
    EngineValues,
)
from scheduler.emulator.metrics import MetricsServer as FakeMetricsServer  # noqa: F401
from scheduler.emulator.metrics import VllmMetrics as FakeVllmMetrics  # noqa: F401
