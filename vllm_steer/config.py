"""Engine-level steering configuration: ``additional_config={"steering": {...}}``.

This is the one argument that turns the plugin on for vLLM's own ``LLM`` class
(and what ``vllm serve --steering-plugin --steering-packs DIR`` fills in)::

    LLM(model=..., additional_config={"steering": {"packs": ["truthful.safetensors"]}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_steer.errors import ConfigError
from vllm_steer.limits import OperatorLimits

ADDITIONAL_CONFIG_KEY = "steering"


class SteeringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    packs: tuple[str, ...] = Field(default=(), description="steer pack files to load")
    packs_dir: str | None = Field(default=None, description="load every *.safetensors in this folder")
    limits: OperatorLimits = Field(default_factory=OperatorLimits, description="per-request caps (limits.py)")
    capture: bool = Field(
        default=False,
        description="capture activations for the fit pipeline (needs enforce_eager=True and prefix caching off)",
    )
    live_packs: bool = Field(
        default=False,
        description="hook every layer at start-up, so packs can be added and removed while the engine "
        "serves (vllm serve --steering-admin-key); packs_dir may then hold no pack",
    )
    hooked_layers: dict[str, Any] | None = Field(
        default=None,
        description="filled in by the plugin at start-up: PackRegistry.graph_key(), the layers the "
        "steering, probe and L2S ops are put into and each pack's content digest. It is part of "
        "additional_config, which vLLM hashes into its torch.compile cache key, so a graph compiled "
        "with other hooks or other packs (or none) is never reused; the workers check it too.",
    )

    def pack_paths(self) -> list[Path]:
        paths = [Path(p) for p in self.packs]
        if self.packs_dir is not None:
            folder = Path(self.packs_dir)
            if not folder.is_dir():
                raise ConfigError(f"steering.packs_dir is not a folder: {folder}", field="steering.packs_dir")
            found = sorted(folder.glob("*.safetensors"))
            if not found and not self.live_packs:
                raise ConfigError(
                    f"steering.packs_dir {folder} holds no *.safetensors steer pack", field="steering.packs_dir"
                )
            paths += found
        return paths


def steering_config_from(additional_config: Mapping[str, Any] | None) -> SteeringConfig | None:
    """The steering config inside vLLM's ``additional_config``; None when the plugin is not enabled."""
    if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[ADDITIONAL_CONFIG_KEY]
    if isinstance(raw, SteeringConfig):
        return raw
    if raw is True:
        raw = {}
    try:
        return SteeringConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(["steering", *(str(p) for p in err["loc"])])
        raise ConfigError(f"invalid {field}: {err['msg']}", field=field) from None
