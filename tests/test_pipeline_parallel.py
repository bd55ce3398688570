"""Pipeline parallelism (PP=2 on CPU): each stage steers and probes its own layers; FASB's score
sums the probes of both stages (the first stage sends its partial sums with its hidden states);
tokens equal the HF reference for ITI, residual, FASB (fixed and per-step strength) and L2S on
either stage. An L2S pack whose read and steer layers fall on different stages is refused at
start-up, naming the stages.

The tiny Llama has 4 layers: stage 0 runs layers 0-1, stage 1 layers 2-3.
"""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_steering import greedy_generate
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

L2S_LAYERS = {"l2s_stage0": (0, 1), "l2s_stage1": (2, 3)}  # pack -> (read layer, steer layer), one stage each


@pytest.fixture(scope="module")
def bind_two_workers():
    # vLLM's CPU workers pin their threads; on a one-NUMA-node machine two ranks need explicit cores.
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if (os.cpu_count() or 1) >= 2 else "0|0"
    yield
    if old is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


@pytest.fixture(scope="module")
def pp2(tiny_model, tmp_path_factory, bind_two_workers):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("pp")
    packs = {"p": save_pack(folder / "p.safetensors",
                            random_pack(shape, "p", num_heads_selected=8, residual_layers=[1, 2], seed=21,
                                        with_probes=True))}
    for seed, (name, (read, steer)) in enumerate(L2S_LAYERS.items()):
        packs[name] = save_pack(folder / f"{name}.safetensors",
                                random_pack(shape, name, num_heads_selected=4, with_probes=True,
                                            l2s=(read, steer, 16), residual_scale=2.0, seed=40 + seed))
    # vLLM's CPU runner makes its pipeline buffers only when it compiles (its eager mode fails PP
    # with or without the plugin), so this engine compiles; the hooks are graph-safe.
    llm = make_llm(path, packs=list(packs.values()), pipeline_parallel_size=2, enforce_eager=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield {"llm": llm, "path": path, "hf": hf, "raw": {n: load_file(str(p)) for n, p in packs.items()}}
    close_llm(llm)


def _heads(raw):
    return [(int(l), int(h), raw["heads.direction"][i], float(raw["heads.sigma"][i]))
            for i, (l, h) in enumerate(zip(raw["heads.layer"], raw["heads.head"]))]


def test_each_stage_steers_its_own_layers_like_hf(pp2):
    llm, hf, raw = pp2["llm"], pp2["hf"], pp2["raw"]["p"]
    heads = _heads(raw)
    assert {l < 2 for l, _, _, _ in heads} == {True, False}  # selected heads on both stages
    prompts = random_prompts(4, 512, seed=9)
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 greedy(10, {"pack": "p", "alpha": 4.0}), use_tqdm=False))
    assert got == [greedy_generate(hf, p, 10, heads=heads, alpha=4.0) for p in prompts]
    plain = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False))
    assert plain == [greedy_generate(hf, p, 10) for p in prompts] and plain != got
    # residual vectors at layer 1 (stage 0) and layer 2 (stage 1)
    residual = {int(l): raw["residual.vector"][i] for i, l in enumerate(raw["residual.layer"])}
    assert sorted(residual) == [1, 2]
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 greedy(10, {"pack": "p", "method": "residual", "alpha": 2.0}), use_tqdm=False))
    assert got == [greedy_generate(hf, p, 10, residual=residual, alpha=2.0) for p in prompts]


@pytest.mark.parametrize("strength", ["code", "paper"])
def test_fasb_scores_the_probes_of_both_stages_and_backtracks_like_hf(pp2, strength):
    """The score needs stage 0's probe sums (sent with its hidden states) and stage 1's; with
    strength="paper" both stages plan the next step's strength from the last stage's scores."""
    from reference.hf_fasb import fasb_generate

    hf, raw = pp2["hf"], pp2["raw"]["p"]
    prompts = random_prompts(8, 512, seed=10)
    kwargs = dict(alpha=6.0, backtrack=3, min_tokens=3, max_tokens=12, strength=strength)
    unsteered = [fasb_generate(hf, p, raw, threshold=0.0, **kwargs) for p in prompts]
    threshold = float(np.median([min(t.scores[2:]) for t in unsteered]))
    spec = {"pack": "p", "method": "fasb", "alpha": 6.0, "threshold": threshold, "backtrack": 3, "min_tokens": 3,
            "strength": strength}
    got = token_ids(pp2["llm"].generate([{"prompt_token_ids": p} for p in prompts], greedy(12, spec),
                                        use_tqdm=False))
    refs = [fasb_generate(hf, p, raw, threshold=threshold, **kwargs) for p in prompts]
    assert 0 < sum(bool(r.triggers) for r in refs) < len(prompts)
    assert got == [r.tokens for r in refs]


@pytest.mark.parametrize("pack", sorted(L2S_LAYERS))
def test_l2s_on_either_stage_matches_hf(pp2, pack):
    from reference.hf_l2s import l2s_generate

    read, steer = L2S_LAYERS[pack]
    prompts = random_prompts(3, 512, seed=11)
    got = token_ids(pp2["llm"].generate([{"prompt_token_ids": p} for p in prompts],
                                        greedy(10, {"pack": pack, "method": "l2s", "alpha": 1.5}), use_tqdm=False))
    assert got == [l2s_generate(pp2["hf"], p, pp2["raw"][pack], method="l2s", alpha=1.5, read_layer=read,
                                steer_layer=steer, max_new_tokens=10)[0] for p in prompts]
    plain = token_ids(pp2["llm"].generate([{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False))
    assert got != plain


def test_every_stage_worker_passed_the_start_up_check(pp2):
    from vllm_steer.integration.engine_stats import ENGINE_STATS_UTILITY

    stats = pp2["llm"].llm_engine.engine_core.call_utility(ENGINE_STATS_UTILITY)
    assert stats["workers_checked"] == 2


def test_an_l2s_pack_split_over_two_stages_is_refused_by_name(tiny_model, tmp_path, bind_two_workers):
    from vllm_steer.errors import ConfigError

    path = tiny_model("llama")
    pack = save_pack(tmp_path / "split.safetensors",
                     random_pack(shape_of_checkpoint(path), "split", l2s=(1, 2, 8), seed=3))
    with pytest.raises(ConfigError, match=r"L2S pack 'split' reads layer 1 \(pipeline stage 0\) and steers "
                                          r"layer 2 \(stage 1\)"):
        make_llm(path, packs=[pack], pipeline_parallel_size=2, enforce_eager=False)


def test_a_condition_pack_under_pipeline_parallelism_is_refused_by_name(tiny_model, tmp_path, bind_two_workers):
    import torch

    from vllm_steer.errors import ConfigError
    from vllm_steer.pack.synthetic import condition_pack

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    pack = save_pack(tmp_path / "cond.safetensors", condition_pack(shape, "cond", torch.ones(shape.hidden_size), 2, 0.5))
    with pytest.raises(ConfigError, match=r"condition pack 'cond'.*pipeline_parallel_size=1"):
        make_llm(path, packs=[pack], pipeline_parallel_size=2, enforce_eager=False)
