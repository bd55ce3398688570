"""Tensor parallelism: with TP=2 each rank steers only its own heads; tokens equal the HF reference.

One case per attention layout: Llama with grouped-query attention (4 heads, 2 KV heads), and Mixtral
with multi-head attention (4 KV heads) and a mixture-of-experts MLP (each rank holds part of every
expert; the residual rows are added to the all-reduced stream)."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_steering import greedy_generate
from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack


LAYOUTS = {"gqa-llama": ("llama", {}), "mha-moe-mixtral": ("mixtral", {"num_kv_heads": 4})}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tp2(request, model_cache, tmp_path_factory):
    family, shape_kwargs = LAYOUTS[request.param]
    path = cached_tiny_checkpoint(family, cache_root=model_cache, **shape_kwargs)
    shape = shape_of_checkpoint(path)
    pack = save_pack(tmp_path_factory.mktemp("tp") / "p.safetensors",
                     random_pack(shape, "p", num_heads_selected=6, residual_layers=[1], seed=21,
                                 with_probes=True))
    # vLLM's CPU workers pin their threads; on a one-NUMA-node machine two ranks need explicit cores.
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if (os.cpu_count() or 1) >= 2 else "0|0"
    try:
        llm = make_llm(path, packs=[pack], tensor_parallel_size=2, enforce_eager=True)
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    yield llm, path, pack
    close_llm(llm)


def test_tp2_steering_matches_hf_reference(tp2):
    from transformers import AutoModelForCausalLM

    llm, path, pack = tp2
    raw = load_file(str(pack))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = random_prompts(4, 512, seed=9)
    heads = [(int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
             for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))]
    # The pack's heads fall on both ranks (4 heads: 0-1 on rank 0, 2-3 on rank 1).
    assert {h // 2 for _, h, _, _ in heads} == {0, 1}
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 greedy(10, {"pack": "p", "alpha": 4.0}), use_tqdm=False))
    assert got == [greedy_generate(hf, p, 10, heads=heads, alpha=4.0) for p in prompts]
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 greedy(10, {"pack": "p", "method": "residual", "alpha": 2.0}), use_tqdm=False))
    assert got == [greedy_generate(hf, p, 10, residual={1: raw["residual.vector"][0]}, alpha=2.0) for p in prompts]


def test_tp2_fasb_scores_all_heads_and_backtracks_like_hf(tp2):
    """Probe heads sit on both ranks, so the score needs both ranks' sums; the backtrack update
    travels to both worker processes."""
    from transformers import AutoModelForCausalLM

    from reference.hf_fasb import fasb_generate

    llm, path, pack = tp2
    raw = load_file(str(pack))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = random_prompts(8, 512, seed=10)
    unsteered = [fasb_generate(hf, p, raw, alpha=6.0, threshold=0.0, backtrack=3, min_tokens=3, max_tokens=12)
                 for p in prompts]
    threshold = float(np.median([min(t.scores[2:]) for t in unsteered]))
    spec = {"pack": "p", "method": "fasb", "alpha": 6.0, "threshold": threshold, "backtrack": 3, "min_tokens": 3}
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12, spec), use_tqdm=False))
    refs = [fasb_generate(hf, p, raw, alpha=6.0, threshold=threshold, backtrack=3, min_tokens=3, max_tokens=12)
            for p in prompts]
    assert 0 < sum(bool(r.triggers) for r in refs) < len(prompts)
    assert got == [r.tokens for r in refs]
