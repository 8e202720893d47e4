"""``dualmap-pd serve`` as a process: config errors exit 2, a run serves and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from scheduler.serve import main
from tests.fakes.openai_server import FakeServerConfig, serve_in_thread

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer(out: Path) -> Path:
    """A word-level tokenizer with a chat template, saved like a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("hello world hi".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    ).save_pretrained(str(out))  # fmt: skip
    return out


def write_config(tmp: Path, prefill_url_ports: list[int], decode_port: int) -> Path:
    cfg = {
        "model": str(tiny_tokenizer(tmp / "model")), "served_model_name": "fake-model",
        "block_size": 16, "max_model_len": 512, "scheduler": {"port": 1},
        "prefill": [{"name": f"p{i}", "port": p, "nixl_side_channel_port": 42000 + i,
                     "kv_events_port": 42100 + i} for i, p in enumerate(prefill_url_ports)],
        "decode": [{"name": "d0", "port": decode_port, "nixl_side_channel_port": 42200}],
    }  # fmt: skip
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_serve(path: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """``python -m scheduler.serve`` on a free port with no intake; returns it and its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler.serve", "--config", str(path), "--port", str(port),
         "--no-kv-events", "--no-engine-metrics", *extra],
        env={**(os.environ if env is None else env), "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, port


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    path = write_config(tmp_path, [8001], 8002)
    assert main(["--config", str(path), "--policy", "no-such-policy"]) == 2
    err = capsys.readouterr().err
    assert "no-such-policy" in err and err.count("\n") == 2


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    with serve_in_thread(FakeServerConfig()) as prefill, serve_in_thread(FakeServerConfig()) as decode:
        path = write_config(tmp_path, [prefill.port], decode.port)
        proc, port = start_serve(path)
        try:
            assert "http://127.0.0.1:" in proc.stdout.readline()  # type: ignore[union-attr]
            body = json.dumps({"model": "fake-model", "prompt": "hello world", "max_tokens": 3}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=10) as r:
                assert json.load(r)["choices"][0]["text"] == " t0 t1 t2"
            assert prefill.requests[0]["prompt"] == "hello world"  # forwarded as the client sent it
            assert prefill.requests[0]["max_tokens"] == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proc.wait(timeout=20)
        assert code == 0 and time.monotonic() - started < 10


def test_serve_requires_the_api_keys_named_in_the_config(tmp_path: Path) -> None:
    key = "sk-serve-0123456789abcdef"
    with serve_in_thread(FakeServerConfig()) as prefill, serve_in_thread(FakeServerConfig()) as decode:
        path = write_config(tmp_path, [prefill.port], decode.port)
        raw = yaml.safe_load(path.read_text())
        raw["scheduler"]["api_keys_file"] = "keys.txt"  # relative to the config file
        path.write_text(yaml.safe_dump(raw))
        (tmp_path / "keys.txt").write_text(f"# clients\n{key}\n")
        env = {k: v for k, v in os.environ.items() if k != "DUALMAP_API_KEYS"}
        proc, port = start_serve(path, env=env)
        try:
            assert "http://127.0.0.1:" in proc.stdout.readline()  # type: ignore[union-attr]
            body = json.dumps({"model": "fake-model", "prompt": "hello world", "max_tokens": 3}).encode()

            def post(headers: dict[str, str]) -> int:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json", **headers})  # fmt: skip
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        return r.status
                except urllib.error.HTTPError as exc:
                    assert json.load(exc)["error"]["code"] == "missing_api_key"
                    return exc.code

            assert post({}) == 401
            assert post({"Authorization": f"Bearer {key}"}) == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
