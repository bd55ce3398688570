"""Composition: one request carries a list of specs, summed per position.

Parity is against ``tests/reference/hf_composed.py``: each member's own single-method HF reference
hooks, all installed on one model (the FASB member through ``hf_fasb.fasb_generate``). The engine
chunks prompts (``max_num_batched_tokens=16``), keeps prefix caching on and runs eager (the ops
run compiled in test_l2s_engine.py and test_fasb_engine.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_composed import composed_generate, composed_hooks, pack_heads, pack_residual
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

MAX_NEW = 10
L2S_LAYERS = (1, 2)  # pack "a": read layer L', steer layer L*
CONSTANT_P = 0.3


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("composition_packs")
    a = random_pack(shape, "a", num_heads_selected=4, residual_layers=(0, 2), with_probes=True,
                    l2s=(*L2S_LAYERS, 16), residual_scale=2.0, seed=40, sigma_scale=3.0)
    b = random_pack(shape, "b", num_heads_selected=3, residual_layers=(1, 2, 3), residual_scale=1.5, seed=41,
                    sigma_scale=3.0)
    crafted = with_constant_probes(random_pack(shape, "crafted", num_heads_selected=5, with_probes=True, seed=42,
                                               sigma_scale=4.0), CONSTANT_P)
    packs = {p.name: save_pack(folder / f"{p.name}.safetensors", p) for p in (a, b, crafted)}
    llm = make_llm(path, packs=list(packs.values()), block_size=32, max_num_batched_tokens=16, enforce_eager=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield {"llm": llm, "hf": hf, "raw": {n: load_file(str(p)) for n, p in packs.items()}}
    close_llm(llm)


def _member(case, spec: dict) -> dict:
    """One engine spec as a reference member (read from the pack file)."""
    raw = case["raw"][spec["pack"]]
    layers = set(spec["layers"]) if spec.get("layers") else None
    common = {"alpha": spec["alpha"], "prompt_positions": spec.get("prompt_positions", "last")}
    if spec["method"] == "iti":
        return {"heads": pack_heads(raw, layers, spec.get("heads")), **common}
    if spec["method"] == "residual":
        return {"residual": pack_residual(raw, layers), **common}
    read, steer = L2S_LAYERS
    return {"l2s": raw, "method": spec["method"], "read_layer": read, "steer_layer": steer, **common}


def _reference(case, prompt, specs, max_new=MAX_NEW):
    fasb = [s for s in specs if s["method"] == "fasb"]
    members = [_member(case, s) for s in specs if s["method"] != "fasb"]
    if not fasb:
        return composed_generate(case["hf"], prompt, max_new, members)
    from reference.hf_fasb import fasb_generate

    f = fasb[0]
    trace = fasb_generate(
        case["hf"], prompt, case["raw"][f["pack"]], alpha=f["alpha"], threshold=f.get("threshold", 0.5),
        backtrack=f.get("backtrack", 10), min_tokens=f.get("min_tokens"), max_backtracks=f.get("max_backtracks", 1),
        max_tokens=max_new,
        extra_hooks=lambda state: composed_hooks(case["hf"], members, len(prompt), state),
    )
    return trace


STATIC = [
    [{"pack": "a", "method": "iti", "alpha": 3.0}, {"pack": "b", "method": "residual", "alpha": 1.5, "layers": [1]}],
    [{"pack": "a", "method": "iti", "alpha": 2.0, "prompt_positions": "all"},
     {"pack": "b", "method": "iti", "alpha": -3.0, "prompt_positions": "all"},
     {"pack": "a", "method": "residual", "alpha": 1.0, "prompt_positions": "all"}],
    [{"pack": "b", "method": "residual", "alpha": 1.0, "prompt_positions": "none"},
     {"pack": "b", "method": "residual", "alpha": -0.5, "layers": [2, 3], "prompt_positions": "none"}],
    [{"pack": "a", "method": "mean_s", "alpha": 1.0}, {"pack": "b", "method": "iti", "alpha": 2.5}],
    # L2S next to residual vectors, one of them at its steer layer L* = 2 (the predictor adds to it)
    [{"pack": "a", "method": "l2s", "alpha": 1.5}, {"pack": "a", "method": "residual", "alpha": 1.0},
     {"pack": "b", "method": "iti", "alpha": 2.0}],
    [{"pack": "a", "method": "l2s", "alpha": -2.0, "prompt_positions": "none"},
     {"pack": "b", "method": "residual", "alpha": 1.0, "layers": [2], "prompt_positions": "none"}],
]


def test_compositions_in_one_batch_match_the_hf_reference(case):
    """Every composition above, each member alone, and unsteered requests, all in one batch (prompts
    of 4 to 40 tokens, so long ones are prefilled in chunks): each request equals its own reference,
    and a composition differs from each of its members alone."""
    prompts = random_prompts(len(STATIC), 512, seed=5, min_len=4, max_len=40)
    requests = [(p, specs) for p, specs in zip(prompts, STATIC)]
    requests += [(prompts[i], [m]) for i, specs in enumerate(STATIC) for m in specs]
    requests += [(p, None) for p in prompts[:2]]
    params = [greedy(MAX_NEW, specs if specs is None or len(specs) > 1 else specs[0]) for _, specs in requests]
    got = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False))
    for (prompt, specs), tokens in zip(requests, got):
        assert tokens == _reference(case, prompt, specs or []), specs
    by_request = {json.dumps(specs): tokens for (_, specs), tokens in zip(requests, got)}
    for specs in STATIC:
        assert all(by_request[json.dumps(specs)] != by_request[json.dumps([m])] for m in specs), specs
    # The same batch again: prefix-cache hits on steered blocks give the same tokens.
    again = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False))
    assert again == got


FASB = [
    [{"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3}, {"pack": "b", "method": "iti", "alpha": 2.0}],
    [{"pack": "b", "method": "residual", "alpha": 1.0, "prompt_positions": "all"},
     {"pack": "crafted", "method": "fasb", "alpha": 5.0, "backtrack": 2, "min_tokens": 6}],
    [{"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3},
     {"pack": "a", "method": "l2s", "alpha": 1.5}, {"pack": "b", "method": "residual", "alpha": 1.0, "layers": [2]}],
    # scores only: the other members steer, the FASB member never does
    [{"pack": "crafted", "method": "fasb", "alpha": 6.0, "backtrack": 3, "max_backtracks": 0},
     {"pack": "a", "method": "iti", "alpha": 3.0}],
]


def test_fasb_composed_with_others_backtracks_like_the_reference(case):
    """The crafted probes score every token 0.3 < threshold 0.5: each request backtracks once
    (unless it only scores), regenerating under the others' steering plus FASB's heads; before the
    backtrack's first position it keeps the others' steering alone."""
    prompts = random_prompts(len(FASB), 512, seed=6, min_len=4, max_len=30)
    got = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in prompts],
                                         [greedy(MAX_NEW, specs) for specs in FASB], use_tqdm=False))
    for prompt, specs, tokens in zip(prompts, FASB, got):
        ref = _reference(case, prompt, specs)
        fasb = next(s for s in specs if s["method"] == "fasb")
        assert len(ref.triggers) == fasb.get("max_backtracks", 1)
        assert tokens == ref.tokens, specs
    alone = token_ids(case["llm"].generate([{"prompt_token_ids": prompts[0]}], greedy(MAX_NEW, FASB[0][0]),
                                           use_tqdm=False))[0]
    assert alone != got[0]


def test_flat_steering_json_steers_like_the_nested_list(case):
    from vllm import SamplingParams

    prompt = random_prompts(1, 512, seed=7, min_len=6, max_len=12)[0]
    nested = token_ids(case["llm"].generate([{"prompt_token_ids": prompt}], greedy(MAX_NEW, STATIC[0]),
                                            use_tqdm=False))[0]
    flat = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                          extra_args={"steering_json": json.dumps(STATIC[0])})
    assert token_ids(case["llm"].generate([{"prompt_token_ids": prompt}], flat, use_tqdm=False))[0] == nested


REFUSED = [
    ({"steering": [{"pack": "crafted", "method": "fasb"}, {"pack": "a", "method": "fasb"}]}, r"steering\[1\]\.method"),
    ({"steering": [{"pack": "a", "method": "l2s"}, {"pack": "a", "method": "l2s", "alpha": 2.0}]},
     r"steering\[1\]\.method"),
    ({"steering": [{"pack": "a"}, {"pack": "nope"}]}, r"steering\[1\]\.pack 'nope' is not loaded"),
    ({"steering": [{"pack": "a"}, {"pack": "b", "method": "residual", "layers": [0]}]}, r"steering\[1\]\.layers"),
    ({"steering": [{"pack": "a"}, {"pack": "b", "prompt_positions": "all"}]}, r"steering\[1\]\.prompt_positions"),
    ({"steering": [{"pack": "crafted", "method": "fasb", "strength": "paper"}, {"pack": "a"}]},
     r"steering\[0\]\.strength"),
    ({"steering": [{"pack": "crafted", "method": "fasb", "max_backtracks": 9}, {"pack": "a"}]},
     r"steering\[0\]\.max_backtracks"),
    ({"steering": [{"pack": "crafted", "method": "fasb"}, {"pack": "a", "prompt_positions": "none"}]},
     r"steering\[1\]\.prompt_positions"),
    ({"steering_json": json.dumps([{"pack": "a"}, {"pack": "nope"}])}, r"steering_json\[1\]\.pack"),
    ({"steering_json": "[{\"pack\": \"a\"},"}, r"steering_json is not JSON"),
]


@pytest.mark.parametrize("extra,match", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_compositions_are_refused_naming_the_member(case, extra, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    prompt = random_prompts(1, 512, seed=8, min_len=5, max_len=5)[0]
    with pytest.raises(VLLMValidationError, match=match):  # parse errors already in SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, extra_args=extra)
        case["llm"].generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert len(token_ids(case["llm"].generate([{"prompt_token_ids": prompt}], greedy(4), use_tqdm=False))[0]) == 4
