"""Fuzzing the client HTTP API (hypothesis) against the scheduler with fake engines.

Every generated request must get an answer that is not a 5xx (the one documented exception is
503 ``no_instance``), every error must be an OpenAI error object, and the valid request sent right
after each case must succeed: no crash, no wedged state. At the end nothing may be left in the
router or counted on a decoder.

The case count is ``DUALMAP_FUZZ_EXAMPLES`` (default 2000: about 25 s on an idle 2-core
machine); set it higher for a longer hunt, and ``DUALMAP_FUZZ_SEED`` to explore other inputs
than CI's fixed ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.fakes.openai_server import FakeServerConfig
from tests.service_harness import MAX_MODEL_LEN, MODEL, Harness, cluster, completion

EXAMPLES = int(os.environ.get("DUALMAP_FUZZ_EXAMPLES", "2000"))
SEED = int(os.environ.get("DUALMAP_FUZZ_SEED", "0"))
PATHS = ("/v1/completions", "/v1/chat/completions")


class ClusterThread:
    """The fake cluster and the scheduler app on their own loop, driven from sync test code."""

    def __init__(self, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-cluster", daemon=True)
        self.thread.start()
        short = FakeServerConfig(max_generated_tokens=4)  # long answers prove nothing more here
        self._cm = cluster(n_prefill=2, n_decode=2, prefill_config=short, decode_config=short, **options)
        self.h: Harness = self.call(self._cm.__aenter__())

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[ClusterThread]:
    c = ClusterThread(max_body_bytes=16 * 1024)
    try:
        yield c
    finally:
        c.close()


# --- strategies ------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) \
    | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[Any]:
    """Usually a valid value, sometimes junk: most requests then pass validation with one or two
    odd fields, which is where handling bugs hide (all-junk requests stop at the first check)."""
    return st.one_of(valid, valid, valid, junk)


budget = st.integers(1, 8) | st.integers(-5, MAX_MODEL_LEN + 10) | st.integers(-2**64, 2**64)
token_ids = st.lists(st.integers(0, 259), min_size=1, max_size=60)
prompt = mostly(st.text(min_size=1, max_size=300) | token_ids,
                st.lists(st.integers(-3, 300), max_size=5) | st.lists(st.text(max_size=20), max_size=3)
                | st.lists(token_ids, max_size=2) | json_values)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant", "tool"]))},
    optional={"content": mostly(st.text(max_size=200), st.lists(json_values, max_size=2) | json_values),
              "name": st.text(max_size=10)})  # fmt: skip
# Fields the scheduler reads, each usually valid; anything else is forwarded to the engine.
common_fields = {
    "model": mostly(st.just(MODEL)),
    "max_tokens": mostly(budget),
    "stream": mostly(st.booleans()),
    "n": mostly(st.just(1), budget),
    "stream_options": mostly(st.just({"include_usage": True})),
    "min_tokens": budget,
    "temperature": mostly(st.floats(0, 2)),
    "ignore_eos": st.booleans(),
    "kv_transfer_params": json_values,
    "user": json_values,
}
completion_body = st.fixed_dictionaries(
    {"prompt": prompt}, optional={**common_fields, "add_special_tokens": mostly(st.booleans())})
chat_body = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=4))},
    optional={**common_fields, "max_completion_tokens": mostly(budget),
              "add_generation_prompt": mostly(st.booleans()),
              "continue_final_message": mostly(st.booleans()),
              "chat_template_kwargs": mostly(st.just({})), "chat_template": json_values,
              "tools": mostly(st.just([])), "documents": json_values})  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(["completion", "chat", "completion", "chat", "json", "bytes", "other"]))
    if kind == "completion":
        return "POST", PATHS[0], json.dumps(draw(completion_body)).encode()
    if kind == "chat":
        return "POST", PATHS[1], json.dumps(draw(chat_body)).encode()
    if kind == "json":
        return "POST", draw(st.sampled_from(PATHS)), json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return "POST", draw(st.sampled_from(PATHS)), draw(st.binary(max_size=300))
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]))
    path = draw(st.sampled_from(["/v1/models", "/health", "/", "/v1/completions", "/v2/x", "/admin"]))
    return method, path, draw(st.binary(max_size=50))


async def _send(h: Harness, method: str, path: str, data: bytes) -> tuple[int, bytes]:
    async with h.client.request(method, h.url + path, data=data,
                                headers={"Content-Type": "application/json"}) as r:  # fmt: skip
        return r.status, await r.read()


def _check_answer(status: int, raw: bytes, path: str) -> None:
    if status < 400:
        return
    if path == "/health" and status == 503:
        return  # the readiness probe's own answer
    body = json.loads(raw)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert status < 500 or (status == 503 and err["code"] == "no_instance"), (status, body)


def test_fuzzed_requests_never_get_a_5xx_and_the_next_valid_request_succeeds(live: ClusterThread) -> None:
    h = live.h
    valid = json.dumps(completion("still fine", max_tokens=2)).encode()
    statuses: Counter[int] = Counter()

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == 0,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(requests())
    def case(req: tuple[str, str, bytes]) -> None:
        method, path, data = req
        status, raw = live.call(_send(h, method, path, data))
        statuses[status] += 1
        _check_answer(status, raw, path)
        status, raw = live.call(_send(h, "POST", PATHS[0], valid))
        assert status == 200, (req, raw[:300])

    case()
    # The generator reaches both sides: requests the engines served and ones the scheduler refused.
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
    sched = h.scheduler
    assert len(sched.router) == 0
    assert all(st.running_requests == 0 and st.active_tokens == 0 for st in sched.view.instances("decode"))
    assert all(st.healthy for st in sched.view.instances())
    assert sched.metrics.errors.value(("internal",)) == 0
