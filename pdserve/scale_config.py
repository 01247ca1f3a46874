"""The `autoscale` sections of the prefill and decode pools (YAML `prefill.autoscale`,
`decode.autoscale`).

Kept out of `pdserve.config_sections` (which embeds them in the pool sections) so that module
stays small; read them through `config.prefill.autoscale` / `config.decode.autoscale`. The
router's autoscaler (`router.autoscaler`) is the only consumer besides the scale RPC, which
caps targets at `max_replicas`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscaleConfig(BaseModel):
    """Bounds and pacing shared by every pool's autoscaler. Subclasses add the thresholds of
    their pool's signal (`scale_up_*` above `scale_down_*`: the gap is the hysteresis)."""

    # Same strictness as every config section (see `pdserve.config_sections.ConfigSection`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    # Key path of the section, for error messages.
    section: ClassVar[str] = "autoscale"

    # Let the router change the pool size on its own (false: only `pdserve scale` does).
    enabled: bool = False
    # The autoscaler keeps the pool within [min_replicas, max_replicas].
    min_replicas: int = Field(default=1, ge=1, le=1024)
    # Also the cap of `pdserve scale` (or the configured `replicas`, if larger).
    max_replicas: int = Field(default=4, ge=1, le=1024)
    # Seconds between two autoscaler actions on the pool; a scale-down also needs the low
    # signal to have lasted this long.
    cooldown_s: float = Field(default=60.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"{self.section}.min_replicas ({self.min_replicas}) must not exceed "
                f"{self.section}.max_replicas ({self.max_replicas})"
            )
        return self

    def _check_hysteresis(self, name: str, down: float, up: float) -> None:
        if down >= up:
            raise ValueError(
                f"{self.section}.scale_down_{name} ({down}) must be below "
                f"{self.section}.scale_up_{name} ({up})"
            )


class PrefillAutoscaleConfig(AutoscaleConfig):
    """Prefill scales on queueing: prompts waiting for a forward pass, per ready replica."""

    section: ClassVar[str] = "prefill.autoscale"

    # Above this many waiting prompts per ready replica the pool grows to enough replicas to
    # bring it back under.
    scale_up_waiting: float = Field(default=4.0, gt=0, le=1_000_000)
    # Below this the pool shrinks by one (if one fewer replica stays under scale_up_waiting).
    scale_down_waiting: float = Field(default=0.5, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _hysteresis(self) -> PrefillAutoscaleConfig:
        self._check_hysteresis("waiting", self.scale_down_waiting, self.scale_up_waiting)
        return self


class DecodeAutoscaleConfig(AutoscaleConfig):
    """Decode scales on KV usage: the fraction of the ready replicas' KV blocks in use
    (reserved for requests admitted or running)."""

    section: ClassVar[str] = "decode.autoscale"

    # Above this fraction the pool grows to enough replicas to bring it back under.
    scale_up_kv_usage: float = Field(default=0.8, gt=0, le=1)
    # Below this the pool shrinks by one (if one fewer replica stays under scale_up_kv_usage).
    scale_down_kv_usage: float = Field(default=0.3, ge=0, lt=1)

    @model_validator(mode="after")
    def _hysteresis(self) -> DecodeAutoscaleConfig:
        self._check_hysteresis("kv_usage", self.scale_down_kv_usage, self.scale_up_kv_usage)
        return self
