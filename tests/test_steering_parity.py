"""Parity: vllm-steer's greedy tokens equal an independent HF-transformers reference (Llama,
compiled: the ops inside the traced graph; the other families run eager in ``test_family_parity``).

The reference (tests/reference/hf_steering.py) is written from the ITI / mean-difference formulas
with forward hooks on plain transformers models, and reads the pack's tensors straight from the
safetensors file, so it shares no code with the engine path.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from steering_cases import concrete, reference_tokens, symbolic_specs
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

MAX_NEW = 12
SPECS = symbolic_specs("heads", "resid")


class FamilyCase:
    def __init__(self, family, path, packs, llm):
        from transformers import AutoModelForCausalLM

        self.family, self.path, self.packs, self.llm = family, path, packs, llm
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.raw = {name: load_file(str(p)) for name, p in packs.items()}
        self.prompts = random_prompts(6, self.hf.config.vocab_size, seed=7, min_len=3, max_len=24)

    def concrete(self, spec):
        return concrete(spec, self.raw)

    def reference_tokens(self, spec, prompt):
        return reference_tokens(self.hf, self.raw, spec, prompt, MAX_NEW)


@pytest.fixture(scope="module", params=["llama"])
def case(request, tiny_model, tmp_path_factory):
    family = request.param
    path = tiny_model(family)
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp(f"packs-{family}")
    packs = {
        "heads": save_pack(folder / "heads.safetensors", random_pack(shape, "heads", num_heads_selected=6, seed=11)),
        "resid": save_pack(
            folder / "resid.safetensors",
            random_pack(shape, "resid", num_heads_selected=0, residual_layers=[1, shape.num_layers - 1], seed=12),
        ),
    }
    llm = make_llm(path, packs=list(packs.values()))
    yield FamilyCase(family, path, packs, llm)
    close_llm(llm)


@pytest.mark.parametrize("spec_index", range(len(SPECS)))
def test_greedy_tokens_match_hf_reference(case, spec_index):
    spec = case.concrete(SPECS[spec_index])
    got = token_ids(case.llm.generate(
        [{"prompt_token_ids": p} for p in case.prompts], greedy(MAX_NEW, spec), use_tqdm=False
    ))
    want = [case.reference_tokens(spec, p) for p in case.prompts]
    assert got == want, f"{case.family} spec={spec}"


def test_steering_changes_tokens(case):
    """Guards the parity test against a no-op: each method changes most prompts' continuations."""
    plain = [case.reference_tokens(None, p) for p in case.prompts]
    for spec in SPECS[1:]:
        spec = case.concrete(spec)
        steered = [case.reference_tokens(spec, p) for p in case.prompts]
        changed = sum(a != b for a, b in zip(plain, steered))
        assert changed >= len(plain) // 2, f"{case.family}: {spec} changed only {changed} of {len(plain)}"
