"""Trace replay: deterministic prompt synthesis and an end-to-end replay against a fake server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dualmap_pd.trace import TraceRecord
from scheduler.replay.prompts import MIN_TOKEN_ID, WORDS, PromptScaling, PromptSynthesizer
from scheduler.replay.client import ReplayInputError, ReplayOptions, main, replay, resolve_base_url
from tests.fakes.openai_server import (
    FakeOpenAIServer,
    FakeServerConfig,
    Fault,
    fault_by_max_tokens,
    serve_in_thread,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def record(ids: list[int], input_length: int | None = None) -> TraceRecord:
    length = len(ids) * 512 if input_length is None else input_length
    return TraceRecord(timestamp=0, input_length=length, output_length=8, hash_ids=ids)


# --- prompt synthesis ---------------------------------------------------------------------


def test_same_id_gives_same_block_every_call_and_instance() -> None:
    first = PromptSynthesizer(PromptScaling(0.25), "tokens")
    second = PromptSynthesizer(PromptScaling(0.25), "tokens")
    assert first.block_token_ids(42) == first.block_token_ids(42) == second.block_token_ids(42)
    assert first.block_token_ids(42) != first.block_token_ids(43)
    assert len(first.block_token_ids(42)) == 128
    assert all(MIN_TOKEN_ID <= t < 8000 for t in first.block_token_ids(42))
    assert first.block_words(7) == second.block_words(7)
    assert set(first.block_words(7)) <= set(WORDS)


def test_blocks_are_identical_across_processes() -> None:
    # A different PYTHONHASHSEED catches any accidental use of the salted built-in hash().
    code = (
        "from scheduler.replay.prompts import PromptSynthesizer as P;"
        "p = P(prompt_format='tokens');"
        "print(p.block_token_ids(123456789)[:64], p.block_words(5)[:16])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = PromptSynthesizer(prompt_format="tokens")
    assert out == f"{here.block_token_ids(123456789)[:64]} {here.block_words(5)[:16]}"


def test_seed_changes_content() -> None:
    assert PromptSynthesizer(seed=0).block_words(1) != PromptSynthesizer(seed=1).block_words(1)


@pytest.mark.parametrize("prompt_format", ["tokens", "text"])
def test_shared_first_ids_share_scaled_prefix(prompt_format: str) -> None:
    synth = PromptSynthesizer(PromptScaling(0.125), prompt_format)  # 64-token blocks
    a = record([1, 2, 3, 4])
    b = record([1, 2, 9], input_length=1400)
    if prompt_format == "tokens":
        units_a, units_b = synth.token_ids(a), synth.token_ids(b)
    else:
        units_a, units_b = synth.text(a).split(" "), synth.text(b).split(" ")
    assert units_a[:128] == units_b[:128]
    assert units_a[128:192] != units_b[128:192]
    # Each block is the same id's block wherever it appears; a cut last block is its prefix.
    block_9 = synth.block_token_ids(9) if prompt_format == "tokens" else synth.block_words(9)
    assert len(units_b) == 175 and units_b[128:] == block_9[:47]


def test_lengths_scale_to_max_prompt_tokens() -> None:
    records = [record([1, 2, 3, 4], 2048), record([1, 2], 1000), record([5], 13)]
    scaling = PromptScaling.fit(records, max_prompt_tokens=256)
    assert scaling.scale == pytest.approx(0.125)
    assert scaling.block_tokens == 64
    synth = PromptSynthesizer(scaling, "tokens")
    assert [len(synth.token_ids(r)) for r in records] == [256, 125, 2]
    text_synth = PromptSynthesizer(scaling, "text")
    assert [len(text_synth.text(r).split(" ")) for r in records] == [256, 125, 2]


def test_no_scaling_when_prompts_already_fit() -> None:
    records = [record([1, 2], 700)]
    assert PromptScaling.fit(records, None).scale == 1.0
    assert PromptScaling.fit(records, 4096).scale == 1.0
    assert len(PromptSynthesizer(prompt_format="tokens").token_ids(records[0])) == 700


def test_bad_synthesis_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        PromptSynthesizer(prompt_format="bytes")
    with pytest.raises(ValueError):
        PromptSynthesizer(vocab_size=50)
    with pytest.raises(ValueError):
        PromptScaling.fit([record([1])], 0)


def test_base_url_accepts_v1_and_endpoint_suffixes() -> None:
    assert resolve_base_url("http://h:8000") == "http://h:8000"
    assert resolve_base_url("http://h:8000/v1/") == "http://h:8000"
    assert resolve_base_url("http://h/proxy/v1/chat/completions") == "http://h/proxy"
    for bad in ("h:8000", "ftp://h", "http://", "http://h:notaport"):
        with pytest.raises(ReplayInputError):
            resolve_base_url(bad)


# --- end-to-end against the fake server -----------------------------------------------------


def write_trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mixed_trace(path: Path) -> Path:
    """Eight requests 10 ms apart: output 3 -> HTTP 500, output 5 -> hang, the rest succeed."""
    outputs = [8, 8, 3, 8, 5, 8, 8, 8]
    rows = [
        {"timestamp": 10 * i, "input_length": 1024 + 100 * i, "output_length": out,
         "hash_ids": [0, i + 1, i + 100]}
        for i, out in enumerate(outputs)
    ]
    return write_trace(path / "trace.jsonl", rows)


FAULTS = fault_by_max_tokens({3: Fault("status", status_code=500), 5: Fault("hang")})


def test_replay_counts_successes_and_failures(tmp_path: Path) -> None:
    config = FakeServerConfig(first_token_delay_s=0.02, inter_token_delay_s=0.005, fault_for=FAULTS)

    async def run() -> tuple:
        async with FakeOpenAIServer(config) as server:
            options = ReplayOptions(
                trace=mixed_trace(tmp_path), url=server.url + "/v1", max_prompt_tokens=200,
                timeout_s=0.5,
            )
            return await replay(options), server.requests

    report, received = asyncio.run(run())
    s = report.summary()
    assert (s["requests"], s["completed"], s["failed"]) == (8, 6, 2)
    assert s["failures_by_kind"] == {"http_500": 1, "timeout": 1}
    assert s["model"] == "fake-model"  # looked up from /v1/models
    assert s["output_tokens"] == 6 * 8
    assert 0.02 <= s["ttft_p50"] < 0.5
    assert s["tpot_p50"] >= 0.004
    assert s["e2e_p50"] > s["ttft_p50"]
    assert s["throughput_rps"] > 0 and s["output_tokens_per_s"] > 0
    assert s["send_lag_p99"] < 0.1
    body = received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 8 and "ignore_eos" not in body
    # Scaled: longest prompt 1724 tokens -> 200, so 512-token blocks become 59 words.
    assert len(body["prompt"].split(" ")) == round(1024 * 200 / 1724)
    assert body["prompt"].split(" ")[:59] == received[1]["prompt"].split(" ")[:59]


def test_chat_tokens_and_stream_faults(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 600, "output_length": 30, "hash_ids": [1, 2]},
        {"timestamp": 5, "input_length": 600, "output_length": 6, "hash_ids": [1, 3]},
        {"timestamp": 9, "input_length": 600, "output_length": 7, "hash_ids": [1, 4]},
    ])
    faults = fault_by_max_tokens({
        6: Fault("stream_error", after_tokens=2), 7: Fault("disconnect", after_tokens=2),
    })
    config = FakeServerConfig(max_generated_tokens=4, fault_for=faults)

    async def run(endpoint: str, prompt_format: str) -> tuple:
        async with FakeOpenAIServer(config) as server:
            options = ReplayOptions(
                trace=trace, url=server.url, endpoint=endpoint, prompt_format=prompt_format,
                max_output_tokens=20, model="m", ignore_eos=True, timeout_s=5,
            )
            return (await replay(options)).summary(), server.requests

    for endpoint, prompt_format in (("chat", "text"), ("completions", "tokens")):
        s, received = asyncio.run(run(endpoint, prompt_format))
        assert (s["completed"], s["failed"]) == (1, 2), endpoint
        assert s["failures_by_kind"] == {"disconnected": 1, "stream_error": 1}
        assert s["output_tokens"] == 4  # capped by the server (an early EOS), read from usage
        assert received[0]["model"] == "m" and received[0]["ignore_eos"] is True
        assert received[0]["max_tokens"] == 20
        if endpoint == "chat":
            assert received[0]["messages"][0]["role"] == "user"
        else:
            assert len(received[0]["prompt"]) == 600 and s["prompt_tokens_mean"] == 600


def test_rate_scale_and_concurrency_limit(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 1000 * i, "input_length": 10, "output_length": 2, "hash_ids": [i]}
        for i in range(4)
    ])
    config = FakeServerConfig(first_token_delay_s=0.1)

    async def run() -> list:
        async with FakeOpenAIServer(config) as server:
            options = ReplayOptions(
                trace=trace, url=server.url, rate_scale=100, concurrency_limit=1
            )
            return (await replay(options)).results

    results = asyncio.run(run())
    assert [r.scheduled_s for r in results] == pytest.approx([0, 0.01, 0.02, 0.03])
    # One slot and 0.1 s per request: each waits for the previous one to finish.
    sent = [r.sent_s for r in results]
    assert all(later - earlier >= 0.09 for earlier, later in zip(sent, sent[1:]))
    assert all(r.failure is None for r in results)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_json_output_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = mixed_trace(tmp_path)
    with serve_in_thread(FakeServerConfig(fault_for=FAULTS)) as server:
        code = main(["--trace", str(trace), "--url", server.url, "--timeout", "0.3",
                     "--qps", "200", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    s = json.loads(out)  # exactly one JSON object, nothing else on stdout
    for key in ("requests", "completed", "failed", "ttft_p50", "ttft_p90", "ttft_p99",
                "tpot_p50", "e2e_p50", "throughput_rps", "output_tokens_per_s",
                "failures_by_kind"):
        assert key in s
    assert (s["completed"], s["failed"]) == (6, 2)

    # Nobody listening: the replay still runs and reports every request as a connect error.
    code = main(["--trace", str(trace), "--url", f"http://127.0.0.1:{free_port()}",
                 "--requests", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "connect_error: 2" in captured.out

    assert main(["--trace", str(tmp_path / "missing.jsonl"), "--url", "http://h:1"]) == 2
    assert "cannot read trace" in capsys.readouterr().err
    assert main(["--trace", str(trace), "--url", "localhost:8000"]) == 2
    assert "--url" in capsys.readouterr().err
    assert main(["--trace", str(trace), "--url", "http://h:1", "--endpoint", "chat",
                 "--prompt-format", "tokens"]) == 2


def test_tokens_per_trace_block_keeps_blocks_whole_and_drops_what_no_longer_fits(tmp_path: Path) -> None:
    from dualmap_pd.workload_prep import WorkloadPrep

    rows = [{"timestamp": 100 * i, "input_length": 512 * n, "output_length": 4,
             "hash_ids": [7, *range(10 * i, 10 * i + n - 1)]}
            for i, n in enumerate((2, 3, 40, 2, 30, 3, 2, 2, 2, 2))]  # fmt: skip
    trace = write_trace(tmp_path / "t.jsonl", rows)

    async def run() -> tuple:
        async with FakeOpenAIServer(FakeServerConfig()) as server:
            options = ReplayOptions(trace=trace, url=server.url, tokens_per_trace_block=128,
                                    workload=WorkloadPrep(max_model_len=1000, warmup_requests=2,
                                                          warmup_qps=0.0), rate_scale=100)  # fmt: skip
            return await replay(options), server.requests

    report, received = asyncio.run(run())
    s = report.summary()
    # 40 and 30 trace blocks = 5,120 and 3,840 tokens > 1,000: dropped and counted, not rescaled.
    assert s["workload"]["dropped_oversized"] == 2 and s["workload"]["kept"] == 8
    assert len(received) == 8 and s["warmup"] == 2 and s["requests"] == 6
    lengths = sorted({len(body["prompt"].split(" ")) for body in received})
    assert lengths == [256, 384]  # each trace block is exactly 128 words (one 128-token block)
    first = [body["prompt"].split(" ")[:128] for body in received]
    assert all(block == first[0] for block in first)  # the shared first id: the same block
    with pytest.raises(ReplayInputError, match="exclude each other"):
        asyncio.run(replay(ReplayOptions(trace=trace, url="http://127.0.0.1:1", tokens_per_trace_block=128,
                                         max_prompt_tokens=100)))  # fmt: skip
