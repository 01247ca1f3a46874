"""Everything one replica needs to run the model: weights, KV cache, block accounting, runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner
from pdserve.config import KVCacheConfig, ModelConfig
from pdserve.messages import ModelInfo, NamedToken

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaEngine:
    loaded: LoadedModel
    kv_cache: PagedKVCache
    block_manager: BlockManager
    runner: ModelRunner

    def kv_layout_fields(self) -> dict[str, object]:
        """Keyword arguments of `kvtransfer.KVLayout` for this replica's KV."""
        return {
            "model_fingerprint": self.loaded.fingerprint,
            "num_layers": self.loaded.num_layers,
            "num_kv_heads": self.loaded.num_kv_heads,
            "head_dim": self.loaded.head_dim,
            "dtype": self.loaded.dtype_name,
        }

    def model_info(self) -> ModelInfo:
        """What the router needs to know about the served model, chat template included."""
        loaded = self.loaded
        return ModelInfo(
            model=loaded.source,
            dtype=loaded.dtype_name,
            model_type=loaded.model_type,
            vocab_size=loaded.vocab_size,
            max_context_tokens=loaded.max_context_tokens,
            eos_token_ids=loaded.eos_token_ids,
            tokenizer_json=loaded.tokenizer_json,
            kv_fingerprint=loaded.fingerprint,
            chat_template=loaded.chat_template,
            special_tokens=[
                NamedToken(name, text) for name, text in sorted(loaded.special_tokens.items())
            ],
        )


def build_replica_engine(
    model_config: ModelConfig, kv_config: KVCacheConfig, torch_threads: int
) -> ReplicaEngine:
    """Loads the model and allocates the KV cache within `kv_config.memory_mb`."""
    torch.set_num_threads(torch_threads)
    loaded = load_model(model_config)
    probe = KVCacheSpec(
        num_layers=loaded.num_layers,
        num_kv_heads=loaded.num_kv_heads,
        head_dim=loaded.head_dim,
        dtype=loaded.dtype,
        block_size=kv_config.block_size,
        num_blocks=1,
    )
    num_blocks = KVCacheSpec.blocks_for_budget(kv_config.memory_mb, probe.bytes_per_block)
    spec = KVCacheSpec(**{**probe.__dict__, "num_blocks": num_blocks})
    kv_cache = PagedKVCache(spec)
    logger.info(
        "KV cache: %d blocks x %d tokens (%d MiB)",
        num_blocks, kv_config.block_size, kv_config.memory_mb,
    )
    return ReplicaEngine(
        loaded=loaded,
        kv_cache=kv_cache,
        block_manager=BlockManager(num_blocks, kv_config.block_size),
        runner=ModelRunner(loaded, kv_cache),
    )
