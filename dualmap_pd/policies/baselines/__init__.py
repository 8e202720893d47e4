"""Baseline prefill policies, registered by name when this package is imported.

=====================  ==============================================================  =========
name                   rule (source)                                                   module
=====================  ==============================================================  =========
round_robin            cycle over eligible instances (DualMap authors' code)           simple
least_loaded           fewest pending uncached prompt tokens (DualMap's evaluation)    simple
cache_affinity         one consistent-hash ring on the first block (DualMap's eval.)   simple
min_ttft               Mooncake conductor, FAST'25 Algorithm 1                         min_ttft
preble                 Preble E2, ICLR 2025 / WukLab/preble                            preble
sglang_cache_aware     sgl-router/src/policies/cache_aware.rs                          sglang
dynamo_kv              ai-dynamo/dynamo lib/kv-router/src/scheduling/selector.rs       dynamo
=====================  ==============================================================  =========

Every baseline sends requests to the engine at once (``late_dispatch = False``), as published.
"""

from dualmap_pd.policies.baselines.common import TRANSFER_FROM, transfer_of
from dualmap_pd.policies.baselines.dynamo import DynamoKVConfig, DynamoKVPolicy
from dualmap_pd.policies.baselines.min_ttft import MinTTFTConfig, MinTTFTPolicy
from dualmap_pd.policies.baselines.preble import PrebleConfig, PreblePolicy
from dualmap_pd.policies.baselines.sglang import SGLangCacheAwareConfig, SGLangCacheAwarePolicy
from dualmap_pd.policies.baselines.simple import (
    CacheAffinityConfig,
    CacheAffinityPolicy,
    LeastLoadedPolicy,
    RoundRobinPolicy,
)

__all__ = [
    "TRANSFER_FROM",
    "CacheAffinityConfig",
    "CacheAffinityPolicy",
    "DynamoKVConfig",
    "DynamoKVPolicy",
    "LeastLoadedPolicy",
    "MinTTFTConfig",
    "MinTTFTPolicy",
    "PrebleConfig",
    "PreblePolicy",
    "RoundRobinPolicy",
    "SGLangCacheAwareConfig",
    "SGLangCacheAwarePolicy",
    "transfer_of",
]
