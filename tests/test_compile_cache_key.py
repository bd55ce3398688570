"""vLLM saves compiled graphs on disk, keyed by (among others) ``additional_config``, and loads them
without guards. The plugin puts its graph key there (``PackRegistry.graph_key``: the layers of each
op, the probing variant included, the L2S layers and every pack's content digest), so a graph
compiled for other packs is never reused. The case that would go wrong with a key of hooked layers
only: the same pack file, same name and heads, gains probes between two starts sharing a cache."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_fasb import fasb_generate
from vllm_steer.pack import build_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack


def _aot_graphs(cache):
    folder = cache / "torch_compile_cache" / "torch_aot_compile"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None


def _stats(llm) -> dict:
    from vllm_steer.integration.engine_stats import ENGINE_STATS_UTILITY

    return llm.llm_engine.engine_core.call_utility(ENGINE_STATS_UTILITY)


def test_a_changed_pack_never_reuses_a_stale_compiled_graph(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "vllm-cache"
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache))
    path = tiny_model("llama")
    probed = random_pack(shape_of_checkpoint(path), "p", num_heads_selected=6, with_probes=True, seed=11,
                         sigma_scale=4.0)
    plain = build_pack(probed.manifest.model_copy(update={"has_probes": False}),
                       {k: v for k, v in probed.tensors().items() if not k.startswith("probes.")})
    assert plain.head_layers.tolist() == probed.head_layers.tolist()
    file = tmp_path / "packs" / "p.safetensors"
    file.parent.mkdir()
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 512, seed=31, min_len=4, max_len=16)]

    save_pack(file, plain)
    first = make_llm(path, packs=[file])  # compiled (the default), graph saved under the cache
    try:
        first.generate(prompts[:2], greedy(6, {"pack": "p", "alpha": 4.0}), use_tqdm=False)
    finally:
        close_llm(first)
    graphs_before = _aot_graphs(cache)

    save_pack(file, probed)  # same file, name and heads: now with probes, so FASB can use it
    fasb = greedy(16, {"pack": "p", "method": "fasb", "alpha": 6.0, "threshold": 0.5, "backtrack": 3,
                       "min_tokens": 2, "max_backtracks": 2})
    second = make_llm(path, packs=[file])
    try:
        got = token_ids(second.generate(prompts, fasb, use_tqdm=False))
        fired = _stats(second)["backtracks"]
    finally:
        close_llm(second)
    # The HF reference with the probed pack (no compiled graph at all).
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    refs = [fasb_generate(hf, p["prompt_token_ids"], str(file), alpha=6.0, threshold=0.5, backtrack=3, min_tokens=2,
                          max_backtracks=2, max_tokens=16) for p in prompts]
    want, want_fired = [r.tokens for r in refs], sum(len(r.triggers) for r in refs)
    assert got == want and fired == want_fired
    assert 0 < want_fired  # the probes decide: a graph without the probe op would score differently
    if graphs_before is not None:  # vLLM saves AOT graphs: the second start compiled its own
        assert len(graphs_before) == 1 and len(_aot_graphs(cache)) == 2
