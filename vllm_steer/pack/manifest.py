"""The steer-pack manifest: a pydantic description of what a pack holds and which model it fits.

The manifest travels inside the pack's safetensors header (metadata key ``vllm_steer.manifest``),
so one file carries both the tensors and their description.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PACK_FORMAT_VERSION = 1
MANIFEST_METADATA_KEY = "vllm_steer.manifest"

Method = Literal["iti", "residual", "l2s", "mean_s"]


class L2SInfo(BaseModel):
    """Where a pack's learn-to-steer predictor reads and writes (L2S, methods.md).

    The predictor ``g(x) = W_out tanh(W_in x + b_in)`` reads the residual stream after decoder layer
    ``read_layer`` (L') at the last prompt token; ``alpha * g(x)`` is added to the residual stream
    after decoder layer ``steer_layer`` (L*). Mean-S adds ``alpha * mean`` there instead.

    ``prompt_format`` says what the predictor was fitted on: ``raw`` prompts (the reference's
    choice) or ``chat`` = each prompt rendered as one user message through the model's chat template
    with the generation prompt, so the read token is the end of the generation prompt, as in a chat
    request (``LLM.chat``, ``/v1/chat/completions``). Packs written before the field read as ``raw``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    read_layer: int = Field(ge=0)
    steer_layer: int = Field(ge=0)
    width: int = Field(gt=0, description="K, the predictor's hidden width")
    prompt_format: Literal["raw", "chat"] = Field(
        default="raw", description="the prompts the predictor was fitted on: raw text or chat-template rendered"
    )


class ConditionInfo(BaseModel):
    """A CAST condition (``vllm-steer fit cast``): whether a prompt calls for a behaviour.

    The prompt's state is the mean, over its tokens, of the residual stream entering decoder layer
    ``layer`` (the output of layer ``layer - 1``); with the unit direction ``condition.direction``
    ``v`` its similarity is ``cos(h, tanh((h . v) v))``, and the condition holds when that similarity
    is ``above`` (or ``below``) ``threshold``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=1, description="the decoder layer whose input is read (the output of layer - 1)")
    threshold: float = Field(ge=-1.0, le=1.0, allow_inf_nan=False)
    comparison: Literal["above", "below"]


class ModelShape(BaseModel):
    """The shape of the model a pack was fitted on; a pack loads only into a model of this shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = Field(min_length=1, description="HF architecture name, e.g. LlamaForCausalLM")
    family: str | None = Field(
        default=None,
        description="vllm-steer's model family of the architecture (None when it steers no such family); "
                    "filled from the architecture when absent or None (packs written before the field)",
    )
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _family_of_architecture(cls, data: Any) -> Any:
        from vllm_steer.models.families import family_name_of

        if not isinstance(data, dict) or not isinstance(data.get("architecture"), str):
            return data
        expected, stored = family_name_of(data["architecture"]), data.get("family")
        if stored is not None and expected is not None and stored != expected:
            raise ValueError(f"family {stored!r} does not match architecture {data['architecture']!r} "
                             f"(whose family is {expected!r})")
        # a pack written before the field, or before its architecture's family was supported, gets
        # the family of its architecture; a family this version does not know stays as written
        return {**data, "family": expected if expected is not None else stored}

    def mismatches(self, other: ModelShape) -> list[str]:
        """Names and values of every field that differs from ``other`` (the loaded model)."""
        return [
            f"{name}: pack has {getattr(self, name)!r}, model has {getattr(other, name)!r}"
            for name in type(self).model_fields
            if getattr(self, name) != getattr(other, name)
        ]


class PackManifest(BaseModel):
    """Everything about a pack that is not a tensor."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = PACK_FORMAT_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: ModelShape
    methods: list[Method] = Field(default_factory=list, description="empty only for a condition-only pack")
    num_heads_selected: int = Field(ge=0, description="K, the number of (layer, head) pairs steered")
    residual_layers: list[int] = Field(default_factory=list)
    has_probes: bool = False
    l2s: L2SInfo | None = None
    condition: ConditionInfo | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="free-form record: dataset, split, seed, accuracies..."
    )

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != PACK_FORMAT_VERSION:
            raise ValueError(f"unsupported pack format_version {v} (this build reads {PACK_FORMAT_VERSION})")
        return v

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[Method]) -> list[Method]:
        if len(set(v)) != len(v):
            raise ValueError("methods must not repeat")
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> PackManifest:
        if not self.methods and self.condition is None:
            raise ValueError("a pack needs at least one method or a condition")
        return self
