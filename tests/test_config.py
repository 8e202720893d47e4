"""Unit tests of the cluster config: loading, path resolution, validation errors. No vLLM."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from scheduler.config import (
    ClusterConfig,
    ConfigError,
    EngineSettings,
    InstanceConfig,
    config_from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def base() -> dict:
    """A valid config dict (2 prefill + 1 decode), fresh per call so tests can mutate it."""
    return {
        "model": "models/tiny-llama",
        "served_model_name": "tiny-llama",
        "block_size": 128,
        "max_model_len": 4096,
        "run_dir": "runs/local",
        "scheduler": {"host": "127.0.0.1", "port": 8000, "policy": "dualmap", "slo_ttft": 5.0},
        "prefill": [
            {"name": "prefill-0", "port": 8100, "kv_events_port": 5557,
             "nixl_side_channel_port": 5600, "cpus": "0"},
            {"name": "prefill-1", "port": 8101, "kv_events_port": 5558,
             "nixl_side_channel_port": 5601, "cpus": "1"},
        ],
        "decode": [{"name": "decode-0", "port": 8200, "nixl_side_channel_port": 5602, "cpus": "1"}],
        "engine": {"kv_cache_space_gib": 1, "enforce_eager": True,
                   "num_gpu_blocks_override": None, "extra_args": []},
    }  # fmt: skip


def build(raw: dict, base_dir: str | Path = "/cfg") -> ClusterConfig:
    return config_from_dict(raw, base_dir=base_dir)


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "scripts" / "cluster.local.yaml")
    assert [i.name for i in cfg.prefill] == ["prefill-0", "prefill-1"]
    assert [i.name for i in cfg.decode] == ["decode-0"]
    assert cfg.model == REPO / "models" / "tiny-llama"  # relative to the file, not the cwd
    assert cfg.run_dir == REPO / "runs" / "local"
    assert cfg.block_size == 128
    assert cfg.scheduler.url == "http://127.0.0.1:8000"


def test_fields_roles_and_urls() -> None:
    cfg = build(base())
    p0, p1, d0 = cfg.instances
    assert (p0.role, p1.role, d0.role) == ("prefill", "prefill", "decode")
    assert p0.url == "http://127.0.0.1:8100"
    assert p0.kv_events_endpoint == "tcp://127.0.0.1:5557"
    assert d0.kv_events_endpoint is None
    assert p0.cpu_list() == [0]
    assert cfg.instance("decode-0") is d0
    assert cfg.engine == EngineSettings()
    assert cfg.model == Path("/cfg/models/tiny-llama")


def test_frozen() -> None:
    cfg = build(base())
    with pytest.raises(AttributeError):
        cfg.block_size = 64  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.prefill[0].port = 1  # type: ignore[misc]


def test_load_relative_paths_from_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = sub / "c.yaml"
    path.write_text(textwrap.dedent("""
        model: ../m
        prefill: [{name: p, port: 9100, kv_events_port: 9557, nixl_side_channel_port: 9600}]
        decode: [{name: d, port: 9200, nixl_side_channel_port: 9601, cpus: 1}]
    """))
    cfg = load_config(path)
    assert cfg.model == tmp_path / "m"
    assert cfg.run_dir == sub / "runs" / "local"
    assert cfg.served_model_name == "m"  # defaults to the model folder's name
    assert cfg.decode[0].cpus == "1"  # YAML int 1 accepted as the CPU list "1"
    assert cfg.source == path.resolve()


def test_with_overrides_revalidates() -> None:
    cfg = build(base())
    new = cfg.with_overrides(engine={"kv_cache_space_gib": 2}, scheduler={"port": 8001})
    assert new.engine.kv_cache_space_gib == 2 and new.engine.enforce_eager is True
    assert new.scheduler.port == 8001 and new.scheduler.policy == "dualmap"
    assert cfg.engine.kv_cache_space_gib == 1  # original untouched
    extra = InstanceConfig("decode-1", "decode", "127.0.0.1", 8201, 5603, cpus="0")
    assert cfg.with_overrides(decode=(*cfg.decode, extra)).decode[-1] is extra
    clash = InstanceConfig("decode-1", "decode", "127.0.0.1", 8100, 5603)
    with pytest.raises(ConfigError, match="8100"):
        cfg.with_overrides(decode=(*cfg.decode, clash))
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.with_overrides(nope=1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("model"), "missing required key 'model'"),
        (lambda r: r.update(prefill=[]), "'prefill' needs at least one instance"),
        (lambda r: r.update(decode={}), "'decode' must be a list"),
        (lambda r: r.update(block_size=0), "block_size must be >= 1"),
        (lambda r: r.update(block_size="128"), "block_size must be an integer"),
        (lambda r: r.update(max_model_len=64), "smaller than block_size"),
        (lambda r: r.update(modle="x"), "unknown key"),
        (lambda r: r["prefill"][0].update(kv_event_port=1), "unknown key.*kv_event_port"),
        (lambda r: r["prefill"][0].pop("kv_events_port"), "need kv_events_port"),
        (lambda r: r["prefill"][0].pop("port"), "missing required key 'port'"),
        (lambda r: r["prefill"][0].update(port=70000), "1..65535"),
        (lambda r: r["prefill"][0].update(port=True), "must be an integer"),
        (lambda r: r["prefill"][1].update(name="prefill-0"), "duplicate instance name"),
        (lambda r: r["prefill"][1].update(name="bad/name"), "may use only"),
        (lambda r: r["decode"][0].update(port=8100), "already used by prefill-0.port"),
        (lambda r: r["decode"][0].update(nixl_side_channel_port=5600), "already used"),
        (lambda r: r["prefill"][1].update(kv_events_port=5557), "already used"),
        (lambda r: r["decode"][0].update(port=8000), "already used by scheduler.port"),
        (lambda r: r["prefill"][0].update(cpus="zero"), "not a CPU list"),
        (lambda r: r.update(scheduler={"slo_ttft": -1}), "slo_ttft must be a positive"),
        (lambda r: r.update(scheduler=[1]), "scheduler must be a mapping"),
        (lambda r: r["engine"].update(enforce_eager="yes"), "true or false"),
        (lambda r: r["engine"].update(extra_args="--foo"), "extra_args must be a list"),
        (lambda r: r["engine"].update(kv_cache_space_gib=0.5), "must be an integer"),
        (lambda r: r["engine"].update(num_gpu_blocks_override=8), "cannot hold one max_model_len"),
        (lambda r: r["engine"].update(kv_lease_duration=0), "kv_lease_duration must be >= 1"),
    ],
)
def test_validation_errors(mutate, message: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        build(raw)


def test_same_port_on_different_hosts_is_fine() -> None:
    raw = base()
    raw["decode"][0].update(host="10.0.0.2", port=8100)
    assert build(raw).decode[0].url == "http://10.0.0.2:8100"


def test_kv_event_ports_clash_on_their_own_machine_only() -> None:
    # KV-event sockets bind tcp://*:port: every interface of their own machine, where every
    # loopback address meets, but not another host's (StatefulSet replicas share port numbers).
    raw = base()
    raw["prefill"][1].update(host="127.0.0.2", kv_events_port=5557)
    with pytest.raises(ConfigError, match="already used by prefill-0.kv_events_port"):
        build(raw)
    raw["prefill"][1].update(host="localhost", port=5557, kv_events_port=5599)
    with pytest.raises(ConfigError, match="already used by prefill-0.kv_events_port"):
        build(raw)
    raw = base()
    raw["prefill"][1].update(host="10.0.0.2", port=8100, kv_events_port=5557,
                             kv_events_replay_port=5567, nixl_side_channel_port=5600)
    cfg = build(raw)
    assert (cfg.prefill[0].kv_events_port, cfg.prefill[1].kv_events_port) == (5557, 5557)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: config must be a mapping"):
        load_config(wrong)


def test_engine_extra_args_and_lease() -> None:
    raw = base()
    raw["engine"].update(extra_args=["--max-num-seqs", "8"], kv_lease_duration=60)
    eng = build(raw).engine
    assert eng.extra_args == ("--max-num-seqs", "8")
    assert eng.kv_lease_duration == 60


def test_cpu_list_ranges() -> None:
    raw = base()
    raw["prefill"][0]["cpus"] = "0-2,5"
    assert build(raw).prefill[0].cpu_list() == [0, 1, 2, 5]
