"""CAST in the engine: a condition pack gates a request's steering on its prompt, decided in the
prefill forward.

Parity is against ``tests/reference/hf_cast.py`` (two passes in plain HF: score the unsteered
prompt's mean state at the condition layer, then generate with the behaviour's own reference hooks
only when the condition holds). The engine runs compiled (the gate op traced into the graph), chunks
prompts (``max_num_batched_tokens=16``) and keeps prefix caching on.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_cast import cast_generate, condition_similarity
from reference.hf_composed import pack_heads, pack_residual
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import condition_pack, random_pack

MAX_NEW = 8
LAYER = 2  # the condition reads the input of decoder layer 2 (the output of layer 1)
NUM_PROMPTS = 8


def _threshold_between(similarities: list[float]) -> float:
    """A threshold near the median with the widest gap to its neighbours, so that float differences
    between the engine and HF cannot flip a prompt."""
    ordered = sorted(similarities)
    n = len(ordered)
    gaps = [(ordered[i + 1] - ordered[i], i) for i in range(n // 4, n - n // 4 - 1)]
    _, i = max(gaps)
    return (ordered[i] + ordered[i + 1]) / 2


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = random_prompts(NUM_PROMPTS, 512, seed=11, min_len=4, max_len=40)
    direction = torch.randn(shape.hidden_size, generator=torch.Generator().manual_seed(12))
    sims = [condition_similarity(hf, p, direction, LAYER) for p in prompts]
    threshold = _threshold_between(sims)
    folder = tmp_path_factory.mktemp("cast_packs")
    packs = [
        random_pack(shape, "behave", num_heads_selected=6, residual_layers=(0, 1, 3), residual_scale=2.0, seed=13,
                    sigma_scale=4.0),
        condition_pack(shape, "cond", direction, LAYER, threshold, "above"),
    ]
    files = {p.name: save_pack(folder / f"{p.name}.safetensors", p) for p in packs}
    llm = make_llm(path, packs=list(files.values()), block_size=32, max_num_batched_tokens=16)
    yield {"llm": llm, "hf": hf, "raw": load_file(str(files["behave"])), "prompts": prompts, "sims": sims,
           "direction": direction, "threshold": threshold}
    close_llm(llm)


def _members(case, specs: list[dict]) -> list[dict]:
    raw = case["raw"]
    out = []
    for spec in specs:
        layers = set(spec["layers"]) if spec.get("layers") else None
        common = {"alpha": spec["alpha"], "prompt_positions": spec.get("prompt_positions", "last")}
        if spec["method"] == "iti":
            out.append({"heads": pack_heads(raw, layers), **common})
        else:
            out.append({"residual": pack_residual(raw, layers), **common})
    return out


def _reference(case, prompt, specs):
    condition = specs[0]["condition"]
    condition = {"pack": condition} if isinstance(condition, str) else condition
    return cast_generate(
        case["hf"], prompt, MAX_NEW, _members(case, specs), direction=case["direction"], layer=LAYER,
        threshold=condition.get("threshold", case["threshold"]), comparison=condition.get("comparison", "above"),
    )


GATED = [
    # heads at layers >= 2 only: gated in the last prompt token's own forward
    [{"pack": "behave", "method": "iti", "alpha": 3.0, "layers": [2, 3], "condition": "cond"}],
    # a residual add after layer 1 (the layer the condition reads) and after layer 3: same forward
    [{"pack": "behave", "method": "residual", "alpha": 1.5, "layers": [1, 3], "condition": "cond"}],
    # every head (layers below 2 too), generated tokens only
    [{"pack": "behave", "method": "iti", "alpha": 3.0, "prompt_positions": "none", "condition": "cond"}],
    # a composition sharing the condition
    [{"pack": "behave", "method": "iti", "alpha": 2.0, "layers": [2, 3], "condition": "cond"},
     {"pack": "behave", "method": "residual", "alpha": 1.0, "layers": [1], "condition": "cond"}],
    # the request's own comparison and threshold, generated tokens only
    [{"pack": "behave", "method": "residual", "alpha": 2.0, "prompt_positions": "none",
      "condition": {"pack": "cond", "comparison": "below"}}],
]


def _spec(specs):
    return specs[0] if len(specs) == 1 else specs


def test_conditioned_requests_match_the_two_pass_reference(case):
    """Every gated spec on every prompt, with unsteered and ungated requests in the same batch; half
    the prompts meet the condition. A request whose prompt meets it equals the behaviour's
    reference, one whose prompt does not equals the unsteered continuation; the same batch again
    (its prompts now in the prefix cache) gives the same tokens."""
    prompts = case["prompts"]
    requests = [(p, specs) for specs in GATED for p in prompts]
    requests += [(p, None) for p in prompts]
    requests += [(p, [{k: v for k, v in GATED[0][0].items() if k != "condition"}]) for p in prompts[:3]]
    params = [greedy(MAX_NEW, None if specs is None else _spec(specs)) for _, specs in requests]
    before = case["llm"].collective_rpc("vllm_steer_stats")[0]
    got = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False))
    after = case["llm"].collective_rpc("vllm_steer_stats")[0]
    plain = dict(zip(map(tuple, prompts), got[len(GATED) * len(prompts):]))
    held = []
    for (prompt, specs), tokens in zip(requests, got):
        if specs is None:
            continue
        if "condition" not in specs[0]:
            from reference.hf_composed import composed_generate
            assert tokens == composed_generate(case["hf"], prompt, MAX_NEW, _members(case, specs))
            continue
        ref, holds = _reference(case, prompt, specs)
        assert tokens == ref, (specs, holds)
        held.append(holds)
        if not holds:
            assert tokens == plain[tuple(prompt)]
    assert 0 < sum(held) < len(held)  # both groups present
    # the engine counts one decision per conditioned request, and as many held as the reference says
    assert after["conditions_decided"] - before["conditions_decided"] == len(held)
    assert after["conditions_met"] - before["conditions_met"] == sum(held)
    # steering does something when the condition holds (so a gate stuck at 0 fails above)
    holding = [p for p, s in zip(prompts, case["sims"]) if s > case["threshold"]]
    steered = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in holding],
                                             greedy(MAX_NEW, _spec(GATED[0])), use_tqdm=False))
    assert any(t != plain[tuple(p)] for p, t in zip(holding, steered))
    again = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False))
    assert again == got


REFUSED = [
    ({"pack": "behave", "condition": "nope"}, r"steering\.condition\.pack 'nope' is not loaded"),
    ({"pack": "behave", "condition": "behave"}, r"steering\.condition\.pack 'behave' holds no condition"),
    ({"pack": "cond", "method": "iti"}, r"steering\.method 'iti' is not in pack 'cond'"),
    ({"pack": "behave", "prompt_positions": "all", "condition": "cond"}, r"steering\.prompt_positions"),
    ({"pack": "behave", "method": "fasb", "condition": "cond"}, r"steering\.condition"),
    ([{"pack": "behave", "condition": "cond"}, {"pack": "behave", "method": "residual"}], r"steering\[1\]\.condition"),
    ({"pack": "behave", "condition": {"pack": "cond", "threshold": 1.5}}, r"steering\.condition\.threshold"),
    # the last prompt token is gated in its own forward: nothing may steer it before the read
    ({"pack": "behave", "method": "iti", "condition": "cond"}, r"steering\.prompt_positions: .*heads of layer [01]"),
    ({"pack": "behave", "method": "residual", "layers": [0], "condition": "cond"},
     r"steering\.prompt_positions: .*residual stream after layer 0"),
    ([{"pack": "behave", "method": "iti", "layers": [2], "condition": "cond"},
      {"pack": "behave", "method": "residual", "layers": [0], "condition": "cond"}], r"steering\[1\]\.prompt_positions"),
]


@pytest.mark.parametrize("spec,match", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_conditions_are_refused_naming_the_field(case, spec, match):
    from vllm.exceptions import VLLMValidationError

    prompt = case["prompts"][0]
    with pytest.raises(VLLMValidationError, match=match):
        case["llm"].generate([{"prompt_token_ids": prompt}], greedy(4, spec), use_tqdm=False)
    assert len(token_ids(case["llm"].generate([{"prompt_token_ids": prompt}], greedy(4), use_tqdm=False))[0]) == 4
