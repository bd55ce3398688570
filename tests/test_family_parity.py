"""Every supported family besides Llama against the independent HF references, one engine each.

Per family (a tiny random checkpoint built from a ``transformers`` config): greedy tokens and each
token's log-probability for ITI (o_proj input) and residual steering in one mixed batch (the
unsteered requests are vLLM against plain HF), probe scores through FASB's decisions, L2S and
Mean-S, capture for the fit pipeline, and text / chat prompts. Llama runs the
same and more compiled (``test_steering_parity``, ``test_fasb_engine``, ``test_l2s_engine``...); the
families run eager with capture on (one engine serves all five checks) and chunked prefill
(``max_num_batched_tokens`` below the longer prompts).

References: ``reference/hf_steering.py`` (ITI, residual), ``reference/hf_fasb.py``,
``reference/hf_l2s.py``, ``reference/hf_capture.py``; they read the pack from its file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_capture import assert_captures_match
from reference.hf_fasb import fasb_generate
from reference.hf_l2s import l2s_generate
from steering_cases import concrete, reference_tokens, symbolic_specs
from vllm_steer.fit.capture import CaptureItem, capture_activations
from vllm_steer.models.families import SUPPORTED
from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

FAMILIES = [f.name for f in SUPPORTED if f.name != "llama"]
# Qwen3 with a head_dim that is not hidden_size / num_heads (4 * 48 = 192 != 128): the o_proj input
# is wider than the residual stream
SHAPES = {"qwen3": {"head_dim": 48}}
MAX_NEW = 10
L2S_LAYERS = (1, 2)  # read after layer 1, steer after layer 2
SPECS = symbolic_specs("p", "p")  # one pack holds the heads (with probes), residual vectors and L2S


class FamilyCase:
    def __init__(self, family, path, pack_path, llm):
        from transformers import AutoModelForCausalLM

        self.family, self.path, self.llm = family, path, llm
        self.shape = shape_of_checkpoint(path)
        # eager attention: HF's SDPA path skips Gemma 2's attention soft-capping
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        self.raw = load_file(str(pack_path))
        self.prompts = random_prompts(6, self.hf.config.vocab_size, seed=7, min_len=3, max_len=40)
        self._steered: dict = {}

    def concrete(self, spec):
        return concrete(spec, {"p": self.raw})

    def steered(self, spec, prompt) -> tuple[list[int], list[float]]:
        """HF greedy tokens of ``prompt`` under a concrete ITI / residual ``spec`` (None: unsteered)
        and their log-probabilities; computed once per (spec, prompt)."""
        key = (json.dumps(spec, sort_keys=True), tuple(prompt))
        if key not in self._steered:
            logprobs: list[float] = []
            tokens = reference_tokens(self.hf, {"p": self.raw}, spec, prompt, MAX_NEW, logprobs=logprobs)
            self._steered[key] = (tokens, logprobs)
        return self._steered[key]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, model_cache, tmp_path_factory):
    family = request.param
    path = cached_tiny_checkpoint(family, cache_root=model_cache, **SHAPES.get(family, {}))
    shape = shape_of_checkpoint(path)
    pack = random_pack(shape, "p", num_heads_selected=6, residual_layers=[1, shape.num_layers - 1],
                       with_probes=True, sigma_scale=4.0, l2s=(*L2S_LAYERS, 16), residual_scale=2.0, seed=12)
    pack_path = save_pack(tmp_path_factory.mktemp(f"packs-{family}") / "p.safetensors", pack)
    llm = make_llm(path, enforce_eager=True, enable_prefix_caching=False, max_num_batched_tokens=32,
                   additional_config={"steering": {"packs": [str(pack_path)], "capture": True}})
    yield FamilyCase(family, path, pack_path, llm)
    close_llm(llm)


def test_iti_and_residual_tokens_and_logprobs_match_hf(case):
    """One mixed batch: every prompt under every spec (unsteered included)."""
    specs = [case.concrete(s) for s in SPECS]
    requests = [(spec, prompt) for spec in specs for prompt in case.prompts]
    params = []
    for spec, _ in requests:
        p = greedy(MAX_NEW, spec)
        p.logprobs = 1
        params.append(p)
    outputs = case.llm.generate([{"prompt_token_ids": p} for _, p in requests], params, use_tqdm=False)
    for (spec, prompt), out in zip(requests, outputs):
        want, want_logprobs = case.steered(spec, prompt)
        completion = out.outputs[0]
        assert list(completion.token_ids) == want, f"{case.family} spec={spec} prompt={prompt}"
        got_logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        np.testing.assert_allclose(got_logprobs, want_logprobs, rtol=1e-3, atol=2e-3,
                                   err_msg=f"{case.family} spec={spec}")


def test_steering_changes_tokens(case):
    """Guards the parity test against a no-op: each spec changes most prompts' continuations."""
    plain = [case.steered(None, p)[0] for p in case.prompts]
    for spec in SPECS[1:]:
        spec = case.concrete(spec)
        changed = sum(case.steered(spec, p)[0] != q for p, q in zip(case.prompts, plain))
        assert changed >= len(plain) // 2, f"{case.family}: {spec} changed only {changed} of {len(plain)}"


def test_probe_scores_fire_like_hf(case):
    """FASB with random (non-constant) probes: whether and where a request fires depends on the
    probe scores of its own tokens, so equal tokens mean equal scores at every checked step."""
    spec = {"pack": "p", "method": "fasb", "alpha": 8.0, "threshold": 0.0, "backtrack": 3, "min_tokens": 3}

    def reference(prompt):
        return fasb_generate(case.hf, prompt, case.raw, alpha=spec["alpha"], threshold=spec["threshold"],
                             backtrack=spec["backtrack"], min_tokens=spec["min_tokens"], max_backtracks=1,
                             max_tokens=MAX_NEW, eos_token_id=None, ignore_eos=True)

    lowest = [min(reference(p).scores[2:]) for p in case.prompts]
    spec["threshold"] = float(np.median(lowest))  # splits the prompts into firing and not
    got = token_ids(case.llm.generate([{"prompt_token_ids": p} for p in case.prompts], greedy(MAX_NEW, spec),
                                      use_tqdm=False))
    fired = 0
    for prompt, tokens in zip(case.prompts, got):
        ref = reference(prompt)
        fired += bool(ref.triggers)
        assert tokens == ref.tokens, f"{case.family}: fired={bool(ref.triggers)}"
    assert 0 < fired < len(case.prompts)


@pytest.mark.parametrize("method", ["l2s", "mean_s"])
def test_l2s_matches_hf(case, method):
    spec = {"pack": "p", "method": method, "alpha": 2.0}
    got = token_ids(case.llm.generate([{"prompt_token_ids": p} for p in case.prompts], greedy(MAX_NEW, spec),
                                      use_tqdm=False))
    want = [l2s_generate(case.hf, p, case.raw, method=method, alpha=spec["alpha"], read_layer=L2S_LAYERS[0],
                         steer_layer=L2S_LAYERS[1], max_new_tokens=MAX_NEW)[0] for p in case.prompts]
    assert got == want, case.family
    plain = [case.steered(None, p)[0] for p in case.prompts]
    assert sum(a != b for a, b in zip(want, plain)) >= len(plain) // 2, "the predictor's vector changes nothing"


def test_capture_matches_hf_hooks(case):
    shape = case.shape
    seqs = random_prompts(5, case.hf.config.vocab_size, seed=3, min_len=4, max_len=50)  # > 32: chunked
    items = [CaptureItem(tuple(s), positions=(len(s) - 1, 1), mean_from=len(s) // 2) for s in seqs]
    got = capture_activations(case.llm, items, shape, batch_size=3, progress=False)
    assert_captures_match(got, items, case.hf, shape.num_heads, shape.head_dim)
    assert not torch.allclose(got.heads_at[0], got.heads_at[1])


def test_text_and_chat_prompts(case):
    """vLLM tokenizes a text prompt and renders a chat as the checkpoint's own tokenizer does (every
    family's tiny checkpoint has the same BPE tokenizer and chat template), and decodes like HF."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(str(case.path))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text = "Q: Who opens the silver key? A:"
    [out] = case.llm.generate([text], params, use_tqdm=False)
    assert list(out.prompt_token_ids) == tok(text).input_ids
    assert list(out.outputs[0].token_ids) == reference_tokens(case.hf, {}, None, out.prompt_token_ids, 8)
    messages = [{"role": "user", "content": "Who keeps the old map?"}]
    [chat] = case.llm.chat(messages, params, use_tqdm=False)
    assert list(chat.prompt_token_ids) == tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    ).input_ids
    assert len(chat.outputs[0].token_ids) == 8
