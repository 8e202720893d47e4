"""Trace-driven discrete-event simulator of DualMap-style routing (colocated or P/D
disaggregated), driving the same PrefillRouter and policies as the live scheduler."""

from dualmap_pd.sim.capacity import CapacityResult, ProbePoint, find_capacity
from dualmap_pd.sim.config import CapacitySearch, ConfigError, SimConfig
from dualmap_pd.sim.simulator import SimResult, SimulationError, Simulator, simulate
from dualmap_pd.sim.workload import PreparedTrace, default_warmup, load_prepared, tile_trace

__all__ = [
    "CapacityResult",
    "CapacitySearch",
    "ConfigError",
    "PreparedTrace",
    "ProbePoint",
    "SimConfig",
    "SimResult",
    "SimulationError",
    "Simulator",
    "default_warmup",
    "find_capacity",
    "load_prepared",
    "simulate",
    "tile_trace",
]
