"""L2S and Mean-S in the engine: the predictor runs inside the prefill forward pass, once per request.

With L' <= L* the vector is computed and added in the same pass (L' = L*: the predictor reads the
unsteered stream after L*, then the steering op adds to it); with L' > L* only generated tokens are
steered. Chat requests (``LLM.chat``) read the last token of the chat-template rendering, the token
``vllm-steer fit l2s --chat-template`` reads.

Parity is against ``tests/reference/hf_l2s.py`` (plain HF hooks, pack read from its file). The engine
chunks long prompts (``max_num_batched_tokens=16``), keeps prefix caching on and has a KV cache small
enough to preempt requests, so every parity case also runs under those conditions.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from reference.hf_l2s import l2s_generate
from vllm_steer.integration.worker import STATS_RPC
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

MAX_NEW = 10
LAYERS = {"before": (1, 2), "after": (3, 1), "same": (2, 2)}  # pack -> (read layer L', steer layer L*)


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("l2s_packs")
    packs = {}
    for seed, (name, (read, steer)) in enumerate(LAYERS.items()):
        pack = random_pack(shape, name, num_heads_selected=4, with_probes=True, l2s=(read, steer, 16),
                           residual_scale=2.0, seed=30 + seed)
        packs[name] = save_pack(folder / f"{name}.safetensors", pack)
    llm = make_llm(path, packs=list(packs.values()), block_size=32, max_num_batched_tokens=16,
                   num_gpu_blocks_override=12, disable_log_stats=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield {"llm": llm, "hf": hf, "raw": {n: load_file(str(p)) for n, p in packs.items()}}
    close_llm(llm)


def _predictions(llm) -> tuple[int, int]:
    stats = llm.collective_rpc(STATS_RPC)[0]
    return stats["l2s_predictions"], stats["l2s_repeats"]


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _reference(case, prompt, spec, max_new=MAX_NEW):
    read, steer = LAYERS[spec["pack"]]
    return l2s_generate(case["hf"], prompt, case["raw"][spec["pack"]], method=spec["method"], alpha=spec["alpha"],
                        read_layer=read, steer_layer=steer, max_new_tokens=max_new,
                        prompt_positions=spec.get("prompt_positions", "last"))


SPECS = [
    {"pack": "before", "method": "l2s", "alpha": 1.5},
    {"pack": "before", "method": "l2s", "alpha": 2.0, "prompt_positions": "none"},
    {"pack": "after", "method": "l2s", "alpha": 1.5, "prompt_positions": "none"},  # L' > L*: generated only
    {"pack": "same", "method": "l2s", "alpha": 1.5},  # L' = L*: read, then add, in the same pass
    {"pack": "same", "method": "l2s", "alpha": 1.5, "prompt_positions": "none"},
    {"pack": "before", "method": "mean_s", "alpha": 1.0},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['method']}-{s['pack']}-{s.get('prompt_positions', 'last')}")
def test_l2s_matches_the_hf_reference_with_chunked_prefill(case, spec):
    # Prompts from 4 to 40 tokens: the long ones are prefilled in chunks of at most 16 tokens.
    prompts = random_prompts(6, 512, seed=3, min_len=4, max_len=40)
    got = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_NEW, spec),
                                         use_tqdm=False))
    refs = [_reference(case, p, spec) for p in prompts]
    assert got == [r[0] for r in refs]
    plain = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in prompts], greedy(MAX_NEW),
                                           use_tqdm=False))
    assert got != plain


@pytest.mark.parametrize("pack", ["after"])
@pytest.mark.parametrize("positions", [None, "last"])
def test_l2s_that_cannot_steer_the_prompt_is_refused_not_weakened(case, pack, positions):
    """L' > L*: the vector exists only after the prefill, so a request that asks (explicitly or by
    default) for the last prompt token to be steered is refused, naming the field. (L' = L* steers
    it: test_l2s_matches_the_hf_reference_with_chunked_prefill.)"""
    from vllm.exceptions import VLLMValidationError

    spec = {"pack": pack, "method": "l2s", "alpha": 1.5, **({"prompt_positions": positions} if positions else {})}
    prompt = random_prompts(1, 512, seed=9, min_len=6, max_len=6)[0]
    with pytest.raises(VLLMValidationError, match=r"steering\.prompt_positions"):
        case["llm"].generate([{"prompt_token_ids": prompt}], greedy(4, spec), use_tqdm=False)
    # the engine serves on
    assert len(token_ids(case["llm"].generate([{"prompt_token_ids": prompt}], greedy(4), use_tqdm=False))[0]) == 4


def test_mixed_batch_under_kv_pressure_predicts_once_per_request(case):
    """L2S next to ITI, FASB (backtracking) and unsteered requests, with preemptions and prefix hits;
    every L2S request's predictor runs exactly once."""
    prompts = random_prompts(40, 512, seed=4, min_len=8, max_len=40)
    kinds = [
        {"pack": "before", "method": "l2s", "alpha": 1.5},
        {"pack": "before", "method": "iti", "alpha": 3.0},
        {"pack": "before", "method": "fasb", "alpha": 4.0, "threshold": 1.0, "backtrack": 3},
        None,
    ]
    specs = [kinds[i % len(kinds)] for i in range(len(prompts))]
    before = _predictions(case["llm"])
    preemptions = _preemptions(case["llm"])
    got = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in prompts],
                                         [greedy(24, s) for s in specs], use_tqdm=False))
    after = _predictions(case["llm"])
    num_l2s = sum(1 for s in specs if s is not None and s["method"] == "l2s")
    assert after[0] - before[0] == num_l2s and after[1] == 0
    # KV pressure preempted requests (FASB backtracks roll back in place: they preempt nothing,
    # except a request KV pressure had already preempted).
    assert _preemptions(case["llm"]) - preemptions > 0
    for p, s, tokens in zip(prompts, specs, got):
        if s is not None and s["method"] == "l2s":
            assert tokens == _reference(case, p, s, max_new=24)[0]
    # The same prompts again: prefix-cache hits, still one prediction per request.
    again = token_ids(case["llm"].generate([{"prompt_token_ids": p} for p in prompts],
                                           [greedy(24, s) for s in specs], use_tqdm=False))
    assert again == got
    assert _predictions(case["llm"])[0] - after[0] == num_l2s


CHATS = [
    "The river watches the light every day. The baker keeps a red door before noon. Who opens the stars?",
    "Q: Who finds an old map? A: the teacher.",
    "My neighbour paints the silver key with great care, again and again, near the sea.",
]


@pytest.mark.parametrize("pack", ["before", "same"])
def test_chat_requests_read_the_end_of_the_chat_template(case, tiny_model, pack):
    """LLM.chat: the engine's prompt is the chat-template rendering with the generation prompt, token
    for token what ``fit l2s --chat-template`` renders, and the predictor reads its last token (here
    in a later chunk than the first: the renderings are longer than 16 tokens). The HF reference
    reading there gives the same tokens; reading one token earlier (a negative control) does not."""
    from transformers import AutoTokenizer

    from vllm_steer.fit.l2s_pipeline import render_chat_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    spec = {"pack": pack, "method": "l2s", "alpha": 2.0}
    outputs = case["llm"].chat([[{"role": "user", "content": c}] for c in CHATS], greedy(MAX_NEW, spec),
                               use_tqdm=False)
    for content, out in zip(CHATS, outputs):
        rendered = tok(render_chat_prompt(tok, content), add_special_tokens=False).input_ids
        assert list(out.prompt_token_ids) == rendered and len(rendered) > 16
        got = list(out.outputs[0].token_ids)
        want, reads = _reference(case, rendered, spec)
        assert got == want and reads == 1
        earlier, _ = l2s_generate(case["hf"], rendered, case["raw"][pack], method="l2s", alpha=2.0,
                                  read_layer=LAYERS[pack][0], steer_layer=LAYERS[pack][1], max_new_tokens=MAX_NEW,
                                  read_position=len(rendered) - 2)
        assert got != earlier
