"""Config dataclass fields that carry their own help text.

Every option of a config dataclass (simulation, workload preparation, observation, migration)
is declared with ``option(default, help, ...)``; ``dualmap_pd.sim.dataclass_args`` turns the
help (and ``metavar``, ``default_doc``, ``aliases``) into CLI options, so an option is described
in one place.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: object, help: str, **extra: object) -> Any:
    """A dataclass field with ``default`` and CLI metadata (``help`` plus any ``extra`` keys)."""
    return field(default=default, metadata={"help": help, **extra})
