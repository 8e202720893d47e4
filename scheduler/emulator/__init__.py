"""Emulated vLLM engines for scheduler-in-the-loop benchmarks (``dualmap-pd emulate``).

Owns an emulated vLLM 0.32 engine, wire-compatible where a router can see it: the OpenAI HTTP
API with NixlConnector ``kv_transfer_params`` (``server``), vLLM's ``/metrics`` exposition
(``metrics``), KV events over ZMQ with the replay socket (``kv_events``); its timing model,
continuous batching with chunked prefill priced by a ``dualmap_pd.cost`` profile (``engine``);
and hosting every instance of a cluster config in one asyncio process (``cluster``). It sleeps
instead of computing, so dozens of engines fit on two cores. The tests' fakes are thin
re-exports of it.

It may import ``dualmap_pd``, ``scheduler.config`` and ``scheduler.dispatch.tokenization`` (the
engine's own tokenization, which the scheduler mirrors); nothing in the serving path imports it.
"""
