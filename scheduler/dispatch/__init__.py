"""The request path after validation: from a routed request to engine answers.

Owns the prefill -> decode handoff (``pd_client``: prefill with ``do_remote_decode``, decode
with the returned ``kv_transfer_params``, retries and fault mapping), pooled upstream HTTP
connections (``upstream``), tokenization with the model's own tokenizer and chat template
(``tokenization``), and the hot-prefix migration runner that executes the policy's copy plans
(``migration_runner``). It sees the Scheduler only through the narrow protocols in
``scheduler.ports``; it may import ``dualmap_pd``, ``scheduler.config``, ``scheduler.prom`` and
``scheduler.http.errors``/``validation`` (the error and request types), nothing else.
"""
