"""Client API keys: the one place a client request's credentials are checked.

Keys come from the ``DUALMAP_API_KEYS`` environment variable (comma-separated) and/or a keys file
(``dualmap-pd serve --api-keys-file``: one key per line, ``#`` comments), never from the cluster
YAML, which is shared and versioned. With no key configured the client API is open; the service
binds 127.0.0.1 by default. Clients send ``Authorization: Bearer <key>``, as OpenAI clients do.

Guarded: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``. Open: ``/health`` and
``/metrics`` (load balancers and scrapers carry no key). The admin API has its own token
(scheduler/http/admin.py); a client key never opens it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiohttp import web

from scheduler.http.errors import INVALID_REQUEST, ApiError

API_KEYS_ENV = "DUALMAP_API_KEYS"
MIN_KEY_CHARS = 16  # shorter keys are guessable; refused at start-up rather than accepted


class ApiKeyError(ValueError):
    """A configured key is unusable (too short, or the keys file cannot be read)."""


def _digest(key: str) -> bytes:
    # Compare digests, not keys: equal lengths, so compare_digest leaks nothing about length.
    return hashlib.sha256(key.encode()).digest()


class ApiKeyGuard:
    """Accepts a request carrying one of the configured keys; open when none is configured."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        digests = set()
        for key in keys:
            key = key.strip()
            if not key:
                continue
            if len(key) < MIN_KEY_CHARS:
                raise ApiKeyError(f"API keys must be at least {MIN_KEY_CHARS} characters")
            digests.add(_digest(key))
        self._digests = tuple(digests)

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], keys_file: str | Path | None = None) -> ApiKeyGuard:
        keys = environ.get(API_KEYS_ENV, "").split(",")
        if keys_file is not None:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except OSError as exc:
                raise ApiKeyError(f"cannot read API keys file {keys_file}: {exc.strerror or exc}") from None
            keys += [line for line in lines if not line.lstrip().startswith("#")]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, request: web.Request) -> None:
        """Raise a 401 ApiError (OpenAI format) unless the request carries a valid key."""
        if not self._digests:
            return
        header = request.headers.get("Authorization")
        if header is None:
            raise ApiError(401, "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
                           type=INVALID_REQUEST, code="missing_api_key", kind="unauthorized")  # fmt: skip
        scheme, _, token = header.strip().partition(" ")
        given = _digest(token.strip())
        # Compare with every key, so the time taken does not tell which one (if any) matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(401, "Incorrect API key provided.", type=INVALID_REQUEST,
                           code="invalid_api_key", kind="unauthorized")  # fmt: skip
