"""Fault injection hooks (config section `faults`), shared by both workers.

Every hook is a no-op unless `faults.target_token_id` is set, and then touches only requests
whose prompt starts with that token id, so tests can fail one request beside healthy ones.
"""

from __future__ import annotations

import logging
import time

from kvtransfer.faults import ChunkFault
from pdserve.config import FaultsConfig
from pdserve.errors import Internal

logger = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, config: FaultsConfig, replica_id: str) -> None:
        self._config = config
        if config.enabled:
            logger.warning("%s: FAULT INJECTION ENABLED: %s", replica_id, config.model_dump())

    def is_target(self, prompt_token_ids: list[int]) -> bool:
        target = self._config.target_token_id
        return target is not None and bool(prompt_token_ids) and prompt_token_ids[0] == target

    def before_prefill(self, prompts: list[list[int]]) -> None:
        """Runs on the forward thread before a prefill pass."""
        if self._config.prefill_delay_s and any(self.is_target(p) for p in prompts):
            time.sleep(self._config.prefill_delay_s)  # the injected stall itself

    def before_decode_step(self, prompts: list[list[int]]) -> None:
        """Runs on the forward thread before a decode step."""
        if self._config.decode_step_delay_s and any(self.is_target(p) for p in prompts):
            time.sleep(self._config.decode_step_delay_s)  # the injected stall itself

    def kv_chunk_fault(self, prompt_token_ids: list[int]) -> ChunkFault | None:
        """The wire fault for a target request's KV transfer, if one is configured."""
        kind = self._config.kv_chunk_fault
        if kind == "none" or not self.is_target(prompt_token_ids):
            return None
        return ChunkFault(kind, self._config.kv_chunk_fault_seq, self._config.kv_chunk_delay_s)

    def check_decode_token(self, prompt_token_ids: list[int]) -> None:
        """Raises for a target request while its step's token is being handled."""
        if self._config.fail_decode_step and self.is_target(prompt_token_ids):
            raise Internal("injected fault: decode step failed for this request")
