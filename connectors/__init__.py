"""KV-migration backends for dualmap-pd, plus the KV-size arithmetic the planner needs.

The core finds the backends by name through the ``dualmap_pd.migrators`` entry-point group and
never imports this package; this package may import ``dualmap_pd`` but never ``scheduler``.

- ``nixl``: :class:`connectors.nixl_migration.NixlPrefixMigrator` copies a prefix's KV blocks
  between two prefill servers with vLLM's own NixlConnector (no engine change).
- ``lmcache``: :class:`connectors.lmcache_migration.LMCachePrefixMigrator`, through LMCache's
  controller; refuses to start (MigrationError) where LMCache cannot run with vLLM.
- :mod:`connectors.nixl_probe`: raw agent-to-agent NIXL throughput, the yardstick for migrations.

Only the pure helpers below live here, so ``import connectors`` stays cheap (no aiohttp, no nixl).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per element of the KV cache. vLLM's default kv_cache_dtype "auto" stores the KV in the
# model's dtype; the fp8 variants store one byte per element.
_DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "int8": 1, "uint8": 1,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class KVSize:
    """Shape of one token's KV cache in a served model (all layers)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    # 2 for ordinary attention (a K and a V vector per head); 1 for MLA, which caches one latent.
    kv_factor: int = 2

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * self.kv_factor * self.dtype_bytes

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def transfer_bytes(self, tokens: int, block_size: int) -> int:
        """Bytes a NIXL pull of ``tokens`` moves: whole blocks, the partial last one included
        (vLLM reads block-sized regions; checked against vllm:nixl_bytes_transferred)."""
        return math.ceil(max(0, tokens) / block_size) * self.bytes_per_block(block_size)


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def kv_size_from_config(config: Mapping[str, Any], kv_cache_dtype: str = "auto") -> KVSize:
    """KV shape from a Hugging Face ``config.json`` dict.

    Covers decoder-only transformers (Llama/Mistral/Qwen/GPT-NeoX/... naming) and MLA models
    (DeepSeek: ``kv_lora_rank`` + ``qk_rope_head_dim`` per layer, no separate V). Multimodal
    configs are read from their ``text_config``. Hybrid models (sliding-window or Mamba layers)
    cache less than this; the result is then an upper bound.
    """
    cfg: Mapping[str, Any] = config.get("text_config") or config
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if not layers:
        raise ValueError("model config has no num_hidden_layers (or n_layer/num_layers)")
    dtype_name = kv_cache_dtype
    if kv_cache_dtype == "auto":
        # transformers >= 4.56 writes "dtype", older versions "torch_dtype".
        found = _first(cfg, "dtype", "torch_dtype") or _first(config, "dtype", "torch_dtype")
        dtype_name = str(found or "")
    dtype_bytes = _DTYPE_BYTES.get(dtype_name.removeprefix("torch."))
    if dtype_bytes is None:
        raise ValueError(f"unknown KV cache dtype {dtype_name!r} (pass kv_cache_dtype explicitly)")
    if cfg.get("kv_lora_rank"):
        latent = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
        return KVSize(int(layers), 1, latent, dtype_bytes, kv_factor=1)
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads
    head_dim = cfg.get("head_dim")
    if not head_dim:
        hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
        if not hidden or not heads:
            raise ValueError("model config has neither head_dim nor hidden_size/num_attention_heads")
        head_dim = int(hidden) // int(heads)
    if not kv_heads:
        raise ValueError("model config has no num_key_value_heads or num_attention_heads")
    return KVSize(int(layers), int(kv_heads), int(head_dim), dtype_bytes)


def kv_size_from_model_dir(model_dir: str | Path, kv_cache_dtype: str = "auto") -> KVSize:
    """KV shape of the model saved in ``model_dir`` (reads its ``config.json``)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from exc
    return kv_size_from_config(config, kv_cache_dtype)


def kv_bytes_per_token(config: Mapping[str, Any], kv_cache_dtype: str = "auto") -> int:
    """layers x kv heads x head dim x 2 (K and V) x dtype bytes, for a ``config.json`` dict."""
    return kv_size_from_config(config, kv_cache_dtype).bytes_per_token


__all__ = ["KVSize", "kv_bytes_per_token", "kv_size_from_config", "kv_size_from_model_dir"]
