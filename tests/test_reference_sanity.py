"""Sanity checks for the test scaffolding itself: the tiny checkpoints and the HF steering reference.

The parity tests elsewhere compare vllm-steer against ``tests/reference/hf_steering.py`` on models
from ``vllm_steer.models.tiny_checkpoint``. They only mean something if (a) the reference with
``alpha=0`` is plain greedy decoding, (b) a nonzero ``alpha`` really changes the tokens, (c) the
checkpoints are reproducible, and (d) vLLM without any steering already agrees with HF transformers
token for token on these models (clear logit margins here; the unsteered requests of
``test_steering_parity`` and ``test_family_parity`` compare vLLM with HF, text and chat prompts
included).
"""

from __future__ import annotations

import filecmp
import json
import statistics

import pytest
import torch

from conftest import random_prompts
from reference.hf_steering import greedy_generate
from vllm_steer.models.families import family_name_of
from vllm_steer.models.tiny_checkpoint import build_tiny_checkpoint, cached_tiny_checkpoint, write_config_only

MAX_NEW = 16
STEER_NEW = 8  # shorter continuations where many reference decodes run
# Qwen3 with an explicit head_dim that is not hidden_size / num_heads (4 * 48 = 192 != 128), so the
# o_proj input is wider than the residual stream.
WIDE_QWEN3 = {"head_dim": 48}
CASES = {family: (family, {}) for family in ("llama", "qwen2", "qwen3")}
CASES["qwen3-hd48"] = ("qwen3", WIDE_QWEN3)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The HF models here are tiny: one intra-op thread is several times faster than several
    (per-op threading overhead dominates, and much worse on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def case_path(model_cache):
    def get(name):
        family, kwargs = CASES[name]
        return cached_tiny_checkpoint(family, cache_root=model_cache, **kwargs)

    return get


@pytest.fixture(scope="module")
def hf_models(case_path):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_hf(case_path(name))
        return cache[name]

    return get


def head_dim_of(model):
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def some_heads(model, seed=0, count=3):
    """``count`` (layer, head, unit direction, sigma) entries, deterministic from the seed."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    picks = [(1, 0), (2, cfg.num_attention_heads - 1), (cfg.num_hidden_layers - 1, 1)][:count]
    heads = []
    for layer, head in picks:
        theta = torch.randn(head_dim_of(model), generator=gen)
        heads.append((layer, head, theta / theta.norm(), 1.5))
    return heads


def some_residual(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(model.config.hidden_size, generator=gen)
    return {1: v / v.norm()}


# --------------------------------------------------------------------------------------------
# (a) checkpoints load in transformers; the reference with alpha=0 is plain greedy decoding


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_loads_in_transformers(name, case_path, hf_models):
    from transformers import AutoTokenizer

    path = case_path(name)
    family, kwargs = CASES[name]
    model = hf_models(name)
    config = json.loads((path / "config.json").read_text())
    assert family_name_of(config["architectures"][0]) == family
    attn = model.model.layers[0].self_attn
    if family == "qwen2":
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
        assert attn.q_proj.bias.abs().sum() > 0
    if family == "qwen3":
        assert config["head_dim"] == kwargs.get("head_dim", 32)
        assert attn.q_norm.weight.shape == (config["head_dim"],) and attn.k_norm.weight.shape == (config["head_dim"],)
        assert attn.o_proj.weight.shape == (config["hidden_size"], config["num_attention_heads"] * config["head_dim"])

    tok = AutoTokenizer.from_pretrained(str(path))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config["pad_token_id"], config["bos_token_id"], config["eos_token_id"])
    assert len(tok) <= config["vocab_size"]
    text = "The river watches the light every day."
    ids = tok(text).input_ids
    assert len(ids) < len(text) / 2  # BPE merges were learnt
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert "Hello" in chat and chat.rstrip().endswith("assistant:")


@pytest.mark.parametrize("name", list(CASES))
def test_reference_without_steering_is_plain_greedy(name, hf_models):
    from transformers import GenerationConfig

    model = hf_models(name)
    # eos_token_id=None: neither side stops (or masks) at EOS, as in the reference.
    gen_cfg = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=model.config.pad_token_id)
    for prompt in random_prompts(3, model.config.vocab_size, seed=3):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), generation_config=gen_cfg)[0, len(prompt):].tolist()
        assert len(expected) == MAX_NEW
        assert greedy_generate(model, prompt, MAX_NEW) == expected
        # Hooks installed with alpha=0 are a no-op.
        assert greedy_generate(model, prompt, MAX_NEW, heads=some_heads(model), residual=some_residual(model),
                               alpha=0.0, prompt_positions="all") == expected


@pytest.mark.parametrize("name", list(CASES))
def test_logit_margins_are_clear(name, hf_models):
    """Top-1 vs top-2 next-token logit gaps are large against float32 noise (median ~1.1-1.3)."""
    model = hf_models(name)
    gaps = []
    with torch.no_grad():
        for prompt in random_prompts(16, model.config.vocab_size, seed=11):
            logits = model(input_ids=torch.tensor([prompt])).logits[0]
            top = logits.topk(2, dim=-1).values
            gaps.extend((top[:, 0] - top[:, 1]).tolist())
    assert statistics.median(gaps) > 0.5


# --------------------------------------------------------------------------------------------
# (b) steering changes the tokens, with the documented position semantics


@pytest.mark.parametrize("method", ["iti", "residual"])
@pytest.mark.parametrize("name", list(CASES))
def test_steering_changes_tokens(name, method, hf_models):
    model = hf_models(name)
    if method == "iti":
        steer = dict(heads=some_heads(model), alpha=8.0)
    else:
        steer = dict(residual=some_residual(model), alpha=6.0)
    prompts = random_prompts(5, model.config.vocab_size, seed=5)
    plain = [greedy_generate(model, p, STEER_NEW) for p in prompts]
    by_mode = {mode: [greedy_generate(model, p, STEER_NEW, prompt_positions=mode, **steer) for p in prompts]
               for mode in ("last", "all", "none")}

    for mode, outs in by_mode.items():
        changed = sum(o != p for o, p in zip(outs, plain))
        assert changed >= len(prompts) - 1, f"{mode}: only {changed}/{len(prompts)} prompts changed"
    # "none" steers generated tokens only: the first new token comes from the unsteered prompt pass.
    assert all(o[0] == p[0] for o, p in zip(by_mode["none"], plain))
    # "last" steers the last prompt token, so the first new token moves for some prompt ...
    assert any(o[0] != p[0] for o, p in zip(by_mode["last"], plain))
    # ... and "all" also steers earlier prompt tokens, which the last one attends to.
    assert by_mode["all"] != by_mode["last"]
    # The sign matters.
    flipped = [greedy_generate(model, p, STEER_NEW, **{**steer, "alpha": -steer["alpha"]}) for p in prompts]
    assert flipped != by_mode["last"]


def test_hooks_are_removed(hf_models):
    model = hf_models("llama")
    prompt = random_prompts(1, model.config.vocab_size, seed=9)[0]
    plain = greedy_generate(model, prompt, 6)
    greedy_generate(model, prompt, 6, heads=some_heads(model), residual=some_residual(model), alpha=8.0)
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer.self_attn.o_proj._forward_pre_hooks
    assert greedy_generate(model, prompt, 6) == plain
    with pytest.raises(ValueError):
        greedy_generate(model, prompt, 2, heads=some_heads(model), alpha=1.0, prompt_positions="first")
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer.self_attn.o_proj._forward_pre_hooks


# --------------------------------------------------------------------------------------------
# (c) reproducible checkpoints, the cache, config-only folders


def test_build_is_deterministic(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", "qwen3", seed=4)
    b = build_tiny_checkpoint(tmp_path / "b", "qwen3", seed=4)
    c = build_tiny_checkpoint(tmp_path / "c", "qwen3", seed=5)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)
    assert filecmp.cmp(a / "tokenizer.json", c / "tokenizer.json", shallow=False)


def test_tied_embeddings(tmp_path):
    model = load_hf(build_tiny_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = random_prompts(1, model.config.vocab_size, seed=1)[0]
    with torch.no_grad():
        top = model(input_ids=torch.tensor([prompt])).logits[0].topk(2, dim=-1).values
    assert float((top[:, 0] - top[:, 1]).median()) > 0.3  # the shared matrix got the output-head scale


def test_cached_checkpoint(tmp_path):
    first = cached_tiny_checkpoint("llama", cache_root=tmp_path, num_layers=2)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = cached_tiny_checkpoint("llama", cache_root=tmp_path, num_layers=2)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = cached_tiny_checkpoint("llama", cache_root=tmp_path, num_layers=2, seed=1)
    assert other != first and other.parent == tmp_path and first.name.startswith("llama-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp dirs left


def test_write_config_only(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    bare = write_config_only(tmp_path / "bare", "qwen3", hidden_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=96, vocab_size=1024)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json"]
    cfg = AutoConfig.from_pretrained(str(bare))
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == ("qwen3", 256, 2, 96)
    assert cfg.architectures == ["Qwen3ForCausalLM"]

    with_tok = write_config_only(tmp_path / "tok", "llama", tokenizer=True, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(str(with_tok))
    cfg = AutoConfig.from_pretrained(str(with_tok))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert len(tok) <= cfg.vocab_size and not (with_tok / "model.safetensors").exists()
