"""The explicit per-family descriptions: an architecture vllm-steer does not steer is refused at
start-up by name (listing the supported ones), and a checkpoint whose layers differ from its
family's layout is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_steer.errors import ConfigError
from vllm_steer.integration.model_hooks import checked_decoder_layers
from vllm_steer.models.families import SUPPORTED, family_of, supported_architectures
from vllm_steer.models.tiny_checkpoint import FAMILIES


def test_supported_families_resolve_and_others_are_refused_by_name():
    assert supported_architectures()[:3] == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    assert {"MistralForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM"} <= set(supported_architectures())
    assert family_of("Qwen3ForCausalLM").name == "qwen3" and family_of("Qwen3MoeForCausalLM").name == "qwen3_moe"
    assert family_of("GptOssForCausalLM").attention == "attn"  # vLLM's name; HF's is self_attn
    # every family the tests build a checkpoint of is a supported family, and the other way round
    assert sorted(f.name for f in SUPPORTED) == sorted(FAMILIES)
    with pytest.raises(ConfigError, match=r"does not steer DeepseekV2ForCausalLM \(MLA: .*supported "
                                          r"architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "):
        family_of("DeepseekV2ForCausalLM")
    with pytest.raises(ConfigError, match=r"does not steer FooForCausalLM \(not a family vllm-steer knows\)"):
        family_of("FooForCausalLM")


class _Attention(nn.Module):
    def __init__(self, with_o_proj: bool) -> None:
        super().__init__()
        if with_o_proj:
            self.o_proj = nn.Linear(4, 4)


class _Layer(nn.Module):
    def __init__(self, with_o_proj: bool = True) -> None:
        super().__init__()
        self.self_attn = _Attention(with_o_proj)


class _Model(nn.Module):
    def __init__(self, layers) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(layers)


def test_a_layer_without_the_projection_is_refused_with_the_reason():
    llama = SUPPORTED[0]
    assert sorted(checked_decoder_layers(_Model([_Layer(), _Layer()]), range(2), llama)) == [0, 1]
    with pytest.raises(RuntimeError, match=r"decoder layer 1 of _Model has no self_attn.o_proj module"):
        checked_decoder_layers(_Model([_Layer(), _Layer(with_o_proj=False)]), range(2), llama)
    with pytest.raises(RuntimeError, match=r"found decoder layers \[0, 1\].*expected 0..2"):
        checked_decoder_layers(_Model([_Layer(), _Layer()]), range(3), llama)
    # a pipeline stage checks only its own layers (the others are placeholders)
    assert sorted(checked_decoder_layers(_Model([nn.Identity(), _Layer()]), range(1, 2), llama)) == [1]


def test_a_steering_engine_on_an_unsupported_architecture_is_refused_at_start_up(tmp_path):
    from transformers import Qwen2MoeConfig
    from vllm import LLM

    from vllm_steer.models.tiny_checkpoint import build_tokenizer

    folder = tmp_path / "qwen2moe"
    Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False,
                   architectures=["Qwen2MoeForCausalLM"]).save_pretrained(str(folder))
    build_tokenizer(128).save_pretrained(str(folder))
    with pytest.raises(ConfigError, match=r"does not steer Qwen2MoeForCausalLM .*supported architectures: "
                                          r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "):
        LLM(model=str(folder), load_format="dummy", dtype="float32", max_model_len=64,
            additional_config={"steering": {"packs": []}})
