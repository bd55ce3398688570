"""The model families vllm-steer steers, each described explicitly: where its attention output
projection and its decoder layer's residual output are, and what the steering ops assume of them.

A steering engine starts only on an architecture listed in ``SUPPORTED`` (refused at start-up by
name otherwise, with the supported list), and the worker checks every decoder layer against its
family's description before hooking it (a checkpoint that differs, e.g. without the projection, is
refused with the reason). Nothing is guessed from module names at run time.

A family is supported once it is tested against the independent HF reference (ITI, residual,
probes, L2S, capture); ``KNOWN`` lists architectures looked at but not yet supported, with why.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_steer.errors import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    """One family's layout in vLLM's model implementation (``name`` is also the family that
    ``vllm_steer.models.tiny_checkpoint`` builds test checkpoints of).

    ``attention`` / ``out_proj``: the attribute path from a decoder layer (``model.layers.N``) to its
    attention module and from there to the output projection, whose input is the per-head attention
    output ``[tokens, heads_on_this_rank * head_dim]``, heads contiguous (ITI's hook point).
    ``layer_output``: ``"hidden_and_residual"`` when the decoder layer returns ``(hidden, residual)``
    whose sum is the residual stream (HF's output of that layer), ``"stream"`` when it returns the
    stream itself. Hook inputs may carry a leading batch dimension of 1 (vLLM's Transformers backend,
    e.g. OLMo 2); the hooks view them as [tokens, width]."""

    name: str
    architectures: tuple[str, ...]
    attention: str = "self_attn"
    out_proj: str = "o_proj"
    layer_output: str = "hidden_and_residual"
    notes: str = ""


SUPPORTED: tuple[ModelFamily, ...] = (
    ModelFamily("llama", ("LlamaForCausalLM",)),
    ModelFamily("qwen2", ("Qwen2ForCausalLM",)),
    ModelFamily("qwen3", ("Qwen3ForCausalLM",), notes="q/k norms inside attention, before the hook point"),
    ModelFamily("mistral", ("MistralForCausalLM",)),
    ModelFamily("mixtral", ("MixtralForCausalLM",), notes="MoE MLP"),
    ModelFamily("qwen3_moe", ("Qwen3MoeForCausalLM",), notes="MoE MLP, q/k norms"),
    ModelFamily("gemma2", ("Gemma2ForCausalLM",),
                notes="norm after o_proj (head steering is renormalised with the head outputs), soft-capping"),
    ModelFamily("gemma3", ("Gemma3ForCausalLM",), notes="norm after o_proj, q/k norms, sliding and full layers"),
    ModelFamily("phi3", ("Phi3ForCausalLM",), notes="fused qkv; vLLM runs it as Llama"),
    ModelFamily("granite", ("GraniteForCausalLM",), layer_output="stream",
                notes="layers return the stream (residual_multiplier inside)"),
    ModelFamily("olmo2", ("Olmo2ForCausalLM",), layer_output="stream"),
    ModelFamily("gpt_oss", ("GptOssForCausalLM",), attention="attn",
                notes="attention at 'attn' (HF: self_attn); attention sinks and o_proj bias (after the hook "
                      "point), sliding and full layers, MoE MLP"),
)

# Architectures looked at (vLLM 0.26 / 0.32 sources) and not supported yet: why.
KNOWN: dict[str, str] = {
    "Qwen2MoeForCausalLM": "same hook points as Qwen2 (MoE MLP); not yet tested against the HF reference",
    "DeepseekV2ForCausalLM": "MLA: o_proj input is heads x v_head_dim, not the config's head_dim; not yet "
                             "supported",
}


def supported_architectures() -> list[str]:
    return [a for family in SUPPORTED for a in family.architectures]


def _supported_family(architecture: str) -> ModelFamily | None:
    return next((f for f in SUPPORTED if architecture in f.architectures), None)


def family_name_of(architecture: str) -> str | None:
    """The name of ``architecture``'s supported family, None when vllm-steer steers no such family."""
    family = _supported_family(architecture)
    return family.name if family is not None else None


def family_of(architecture: str) -> ModelFamily:
    """The supported family of ``architecture``; ConfigError naming it and the supported ones."""
    family = _supported_family(architecture)
    if family is not None:
        return family
    why = KNOWN.get(architecture, "not a family vllm-steer knows")
    raise ConfigError(
        f"vllm-steer does not steer {architecture} ({why}); supported architectures: "
        f"{', '.join(supported_architectures())}",
        field="model",
    )
