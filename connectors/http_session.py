"""An aiohttp session that a migrator either borrows from its caller or owns itself."""

from __future__ import annotations

import aiohttp


class LazySession:
    """Hands out one ``aiohttp.ClientSession``; closes it only if it made it.

    A caller that passes its own session keeps owning it (it may serve other work). Otherwise
    the session is created lazily, because an aiohttp session must be made inside the running
    event loop, and a constructor may run outside one.
    """

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._owned = session is None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owned = True
        return self._session

    async def close(self) -> None:
        if self._owned and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
