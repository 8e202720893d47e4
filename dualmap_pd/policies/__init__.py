"""Routing policies, registered by name. Importing this package registers all of them."""

from dualmap_pd.policies import baselines, decode, dualmap  # noqa: F401  (registration)
from dualmap_pd.policies.base import (
    DECODE_POLICIES,
    PREFILL_POLICIES,
    DecodePolicy,
    PolicyContext,
    PrefillPolicy,
)

__all__ = ["DECODE_POLICIES", "PREFILL_POLICIES", "DecodePolicy", "PolicyContext", "PrefillPolicy"]
