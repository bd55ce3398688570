"""Capture through vLLM equals plain HF hooks on the same model (float32, tight tolerance): Llama here,
the other families in ``test_family_parity``."""

import pytest
import torch

from conftest import close_llm, random_prompts
from reference.hf_capture import assert_captures_match
from vllm_steer.fit.capture import CaptureItem, capture_activations, capture_engine
from vllm_steer.pack.hf_shape import shape_of_checkpoint


@pytest.fixture(scope="module")
def setup(tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    llm = capture_engine(str(path), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=48)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield llm, hf, shape_of_checkpoint(path)
    close_llm(llm)


def test_captured_activations_match_hf_hooks(setup):
    llm, hf, shape = setup
    seqs = random_prompts(20, 512, seed=3, min_len=4, max_len=60)  # > 48 tokens: chunked prefill
    items = [CaptureItem(tuple(s), positions=(len(s) - 1, 1), mean_from=len(s) // 2) for s in seqs]
    got = capture_activations(llm, items, shape, batch_size=7, progress=False)
    assert_captures_match(got, items, hf, shape.num_heads, shape.head_dim)
    # Different sequences give different activations (the comparison is not vacuous).
    assert not torch.allclose(got.heads_at[0], got.heads_at[1])


def test_capture_needs_eager_engine(tiny_model):
    from vllm_steer.errors import ConfigError
    from conftest import make_llm

    with pytest.raises(ConfigError, match="enforce_eager"):
        make_llm(tiny_model("llama"), additional_config={"steering": {"capture": True}})
