"""The front door: everything a client or an operator talks to over HTTP.

Owns the aiohttp application (``app``), request validation into ``GenerationRequest``
(``validation``), the OpenAI error objects every rejection uses (``errors``), client API keys
(``auth``), and the admin API with its host allow-list (``admin``, ``allowlist``). It turns
HTTP into calls on the Scheduler and the membership registry; it may import ``scheduler.config``,
``scheduler.prom``, ``scheduler.service`` and ``scheduler.dispatch``, never the intake or the
local-cluster tools.
"""
