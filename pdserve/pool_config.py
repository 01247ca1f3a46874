"""The config sections of the replica pools: resources, KV cache and batching of the prefill,
decode and colocated pools.

Only `pdserve.config` assembles them into the tree and reads YAML; import from there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pdserve.config_sections import ConfigSection
from pdserve.placement import LabelKey, LabelSelector, ResourceAmount, ResourceName
from pdserve.scale_config import DecodeAutoscaleConfig, PrefillAutoscaleConfig


class ResourcesConfig(ConfigSection):
    """Resources of one replica (one Ray actor) and which nodes the pool's replicas may use.

    `pdserve.placement` turns this into Ray actor options and checks, before any replica starts,
    that some node of the cluster can host one."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    # torch intra-op threads inside the replica.
    torch_threads: int = Field(default=1, ge=1, le=1024)
    # Pin the replica process to `torch_threads` cores of its node that no other replica of the
    # node holds (pdserve/cpu_pinning.py); when too few are free it runs unpinned with a
    # WARNING and pdserve_replica_pinned_cpus 0.
    pin_cpus: bool = False
    # Ray custom resources each replica reserves, e.g. {pdserve_prefill: 1}: only nodes started
    # with them (`ray start --resources`) host the pool. An amount of 0 requires nothing.
    custom_resources: dict[ResourceName, ResourceAmount] = Field(default_factory=dict)
    # Ray label selector the replica's node must match, e.g. {pdserve/role: prefill} for nodes
    # started with `ray start --labels pdserve/role=prefill`.
    node_labels: dict[LabelKey, LabelSelector] = Field(default_factory=dict)
    # default: Ray's default policy (fills a node up to about half, then moves to the next);
    # spread: replicas on as many different nodes as possible (Ray's SPREAD). There is no
    # "pack": a placement group fixes the replica count, which live scaling changes.
    placement_strategy: Literal["default", "spread"] = "default"


class KVCacheConfig(ConfigSection):
    """The paged KV cache of one replica."""

    # Tokens per block.
    block_size: int = Field(default=16, ge=1, le=1024)
    # Memory for the cache tensor, in MiB; sets the number of blocks.
    memory_mb: int = Field(default=256, ge=1)


class DecodeKVCacheConfig(KVCacheConfig):
    """The KV cache of a replica that decodes (decode and colocated pools)."""

    # on_demand: a request's reservation covers its prompt plus `reserve_new_tokens`, and a
    # running sequence gains a block when it needs one (preempting others when none is free);
    # full: the reservation covers prompt + max_tokens up front (no growth, no preemption).
    reservation: Literal["on_demand", "full"] = "on_demand"
    # on_demand: room for this many generated tokens reserved with the prompt.
    reserve_new_tokens: int = Field(default=16, ge=0, le=1_048_576)


class PrefillPoolConfig(ConfigSection):
    replicas: int = Field(default=1, ge=1, le=1024)
    resources: ResourcesConfig = ResourcesConfig()
    kv_cache: KVCacheConfig = KVCacheConfig()
    # Largest number of prompt tokens in one batched forward pass.
    max_batch_tokens: int = Field(default=4096, ge=16)
    # Largest number of prompts in one batched forward pass.
    max_batch_size: int = Field(default=16, ge=1)
    # Largest part of one prompt a pass computes: a longer prompt is prefilled in chunks over
    # several passes, and prompts queued behind it join those passes instead of waiting for
    # all of it (their time to first token stays short). Capped by max_batch_tokens.
    max_chunk_tokens: int = Field(default=512, ge=1)
    # Prompts waiting for a forward pass; more are rejected with RESOURCE_EXHAUSTED.
    max_waiting_requests: int = Field(default=256, ge=1)
    # How long finished KV waits for the decode side before it is freed.
    lease_ttl_s: float = Field(default=30.0, gt=0)
    # Keep the KV of full prompt blocks after a request, keyed by a hash of every token up to
    # the block's end, so a later prompt with the same prefix skips computing it.
    prefix_caching: bool = True
    # Live scaling bounds and the queue-driven autoscaler (see `pdserve.scale_config`).
    autoscale: PrefillAutoscaleConfig = PrefillAutoscaleConfig()


class DecodePoolConfig(ConfigSection):
    replicas: int = Field(default=1, ge=1, le=1024)
    resources: ResourcesConfig = ResourcesConfig()
    kv_cache: DecodeKVCacheConfig = DecodeKVCacheConfig(memory_mb=512)
    # Largest number of sequences in one decode step.
    max_batch_size: int = Field(default=64, ge=1)
    # Live scaling bounds and the KV-usage-driven autoscaler (see `pdserve.scale_config`).
    autoscale: DecodeAutoscaleConfig = DecodeAutoscaleConfig()


class ColocatedPoolConfig(ConfigSection):
    """`mode: colocated`: replicas that prefill and decode (the prefill and decode pools are
    not started then). Each step is one forward pass over every running sequence's next token
    plus chunks of waiting prompts."""

    replicas: int = Field(default=2, ge=1, le=1024)
    resources: ResourcesConfig = ResourcesConfig()
    kv_cache: DecodeKVCacheConfig = DecodeKVCacheConfig(memory_mb=512)
    # Largest number of sequences in one step: decoding ones plus prompts being prefilled.
    max_batch_size: int = Field(default=64, ge=1)
    # Prompt tokens one step may prefill (decode tokens come on top); a longer prompt is
    # prefilled in chunks over several steps, so running sequences keep getting tokens.
    max_prefill_tokens_per_step: int = Field(default=512, ge=1, le=1_048_576)
