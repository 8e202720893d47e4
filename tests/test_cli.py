"""The ``dualmap-pd`` command-line contract (other tooling parses its output)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from dualmap_pd import cli
from dualmap_pd.sim.dataclass_args import add_dataclass_arguments, dataclass_from_args

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "scripts" / "traces" / "synthetic_trace.jsonl"
SIM_KEYS = {"requests", "ttft_p50", "ttft_p90", "ttft_p99", "slo_attainment", "cache_hit_ratio", "load_cv"}
MORE_KEYS = {"tpot_p50", "tpot_p90", "kv_bytes_moved", "decisions", "completed"}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "small.jsonl"
    path.write_text("".join(SYNTHETIC.read_text().splitlines(keepends=True)[:150]))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dualmap_pd.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_sim_json_is_exactly_one_object(trace: Path) -> None:
    proc = run_cli("sim", "--trace", str(trace), "--policy", "dualmap", "--mode", "disaggregated", "--prefill", "4", "--decode", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # fails on anything but exactly one JSON document
    assert isinstance(out, dict) and SIM_KEYS | MORE_KEYS <= set(out)
    # The paper's preparation (default) drops prompts over max_model_len and says so.
    assert out["dropped_oversized"] > 0 and out["requests"] + out["dropped_oversized"] == 150
    assert out["completed"] == out["requests"] and out["warmup"] == out["requests"] // 10
    assert out["workload"]["description"].startswith("paper workload:")
    assert out["decode_instances"] == 2 and out["kv_bytes_moved"] > 0
    legacy = json.loads(run_cli("sim", "--trace", str(trace), "--no-paper-workload", "--json").stdout)
    assert legacy["requests"] == 150 and legacy["warmup"] == 15 and legacy["dropped_oversized"] == 0


_ALL_POLICIES_JSON = """
import json, sys
from dualmap_pd.policies import PREFILL_POLICIES
from dualmap_pd.sim import SimConfig, Simulator, load_prepared
trace = load_prepared(sys.argv[1])
out = {}
for name in PREFILL_POLICIES.names():
    for mode in ("colocated", "disaggregated"):
        cfg = SimConfig(trace=sys.argv[1], policy=name, mode=mode, prefill=4, rate_scale=3.0)
        out[f"{mode}/{name}"] = Simulator(cfg, trace).run().summary()
print(json.dumps(out, sort_keys=True))
"""


def test_results_do_not_depend_on_the_process_hash_seed(trace: Path) -> None:
    # Same seed -> same JSON across processes, whatever PYTHONHASHSEED (str hashing) is.
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", _ALL_POLICIES_JSON, str(trace)], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]


def test_sim_options_reach_the_config(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sim", "--trace", str(trace), "--qps", "2", "--requests", "40", "--warmup", "0", "--slo-ttft", "3", "--json"]
    assert cli.main([*argv, "--profile", "llama8b-h100", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 40 and out["measured_requests"] == 40 and out["slo_ttft"] == 3.0
    assert out["profile"] == "llama8b-h100" and out["seed"] == 3 and out["offered_qps"] == pytest.approx(2.0)
    assert cli.main(["sim", "--trace", str(trace), "--requests", "40"]) == 0
    assert "TTFT ms" in capsys.readouterr().out  # the human-readable summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "no_such_policy"], "unknown policy"),
        (["--profile", "no_such_profile"], "unknown profile"),
        (["--qps", "2", "--rate-scale", "2"], "not both"),
        (["--mode", "sideways"], "invalid choice"),
        (["--prefill", "0"], "must be positive"),
    ],
)
def test_bad_input_exits_2_with_one_line(trace: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) if "--mode" in extra else _no_raise():
        code = cli.main(["sim", "--trace", str(trace), *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_trace_exits_2_in_a_real_process(tmp_path: Path) -> None:
    proc = run_cli("sim", "--trace", str(tmp_path / "absent.jsonl"), "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"dualmap-pd sim: error: trace not found: {tmp_path / 'absent.jsonl'}"]


def test_malformed_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": "x"}\n')
    assert cli.main(["sim", "--trace", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_capacity_json_and_plot(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "att.png"
    argv = ["capacity", "--trace", str(trace), "--policies", "dualmap", "--prefill", "2", "--tolerance", "0.1", "--json", "--plot", str(png)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) == {"dualmap"}
    res = out["dualmap"]
    assert {"capacity_qps", "slo_attainment_at_capacity", "cache_hit_ratio", "points"} <= set(res)
    assert res["capacity_qps"] > 0 and res["slo_attainment_at_capacity"] >= 0.9
    assert any(p["qps"] == res["capacity_qps"] and p["passed"] for p in res["points"])
    assert png.stat().st_size > 0 and "capacity dualmap: qps" in captured.err


def test_capacity_rejects_unknown_policy_before_simulating(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["capacity", "--trace", str(trace), "--policies", "dualmap,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown policy 'bogus'" in err and "qps" not in err


# -- plugin subcommands --------------------------------------------------------------------------------
@dataclass
class FakeEntryPoint:
    name: str
    target: Any

    def load(self) -> Any:
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def _register_hello(subparsers: Any) -> None:
    p = subparsers.add_parser("hello", help="say hello")
    p.add_argument("--who", default="world")
    p.set_defaults(func=lambda args: print(f"hello {args.who}") or 0)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        assert group == "dualmap_pd.commands"
        loaded.append(group)
        return [
            FakeEntryPoint("hello", _register_hello),
            FakeEntryPoint("serve", ModuleNotFoundError("No module named 'aiohttp'")),
        ]

    monkeypatch.setattr(cli, "entry_points", fake_entry_points)
    return loaded


def test_plugin_commands_are_discovered(plugins: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hello", "--who", "tests"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello tests\n" and captured.err == ""  # a broken plugin stays silent


def test_broken_plugin_notes_one_line_only_when_invoked(plugins: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serve" in err[0] and "aiohttp" in err[0]


def test_builtin_commands_do_not_import_plugins(plugins: list[str], trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sim", "--trace", str(trace), "--requests", "10", "--json"]) == 0
    assert plugins == [] and capsys.readouterr().err == ""


# -- dataclass -> argparse -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Demo:
    name: str
    count: int = 3
    ratio: float | None = None
    fast: bool = True
    kind: Literal["a", "b"] = "a"


def test_dataclass_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo)
    args = parser.parse_args(["--name", "x", "--ratio", "0.5", "--no-fast", "--kind", "b"])
    assert dataclass_from_args(Demo, args) == Demo(name="x", count=3, ratio=0.5, fast=False, kind="b")
    assert dataclass_from_args(Demo, parser.parse_args(["--name", "y"]), count=9) == Demo(name="y", count=9)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --name is required: the field has no default


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False
