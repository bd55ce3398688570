"""Small checkpoints of every family in ``FAMILIES`` built offline from a ``transformers`` config:
random weights and a byte-level BPE tokenizer trained on a generated corpus. Both HF transformers
and vLLM load them (MoE families get 4 experts, 2 per token; Gemma ties its embeddings).

No weights can be downloaded on our machines, so tests, demos and benchmarks build their models
here. Weights are deterministic from the seed. The output head is initialised larger than usual so
greedy decoding has clear margins between the top two logits, which keeps token-level parity tests
between two float32 implementations from hinging on last-bit rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gemma2", "gemma3", "phi3", "granite",
            "olmo2", "gpt_oss")
_BUILDER_VERSION = 3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_SUBJECTS = ["the river", "a small bird", "the old market", "my neighbour", "the train", "a quiet cat",
             "the teacher", "our garden", "the north wind", "a tall ship", "the baker", "the city"]
_VERBS = ["watches", "finds", "carries", "remembers", "follows", "paints", "answers", "opens", "keeps"]
_OBJECTS = ["the light", "a red door", "the morning bread", "an old map", "the last letter", "the stars",
            "a heavy box", "the evening news", "a green field", "the silver key"]
_ENDINGS = ["every day.", "before noon.", "with great care.", "in the rain.", "again and again.",
            "without a word.", "at the station.", "near the sea."]


def training_corpus(num_sentences: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        lines.append(s[0].upper() + s[1:])
        lines.append(f"Q: Who {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}? A: {rng.choice(_SUBJECTS)}.")
    return lines


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (transformers' PreTrainedTokenizerFast) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _derived_head_dim(family: str, head_dim, hidden_size, num_heads) -> None:
    if head_dim not in (None, hidden_size // num_heads):
        raise ValueError(f"{family} derives head_dim from hidden_size / num_heads")


def _config(family: str, *, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
            intermediate_size, max_position_embeddings, init_std, tie_word_embeddings, bos_id, eos_id, pad_id):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, rms_norm_eps=1e-6, torch_dtype="float32",
    )
    head_dim_or_default = head_dim or hidden_size // num_heads
    # MoE families: 4 small experts, 2 per token (vLLM's CPU MoE wants widths divisible by 32)
    moe_width = max(32, intermediate_size // 4)
    if family == "llama":
        cfg, arch = transformers.LlamaConfig(**common, head_dim=head_dim_or_default), "LlamaForCausalLM"
    elif family == "qwen2":
        _derived_head_dim(family, head_dim, hidden_size, num_heads)
        cfg, arch = transformers.Qwen2Config(**common, use_sliding_window=False), "Qwen2ForCausalLM"
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=head_dim_or_default, use_sliding_window=False)
        arch = "Qwen3ForCausalLM"
    elif family == "mistral":
        # HF's default sliding window (4096) would be applied by vLLM to every layer
        cfg = transformers.MistralConfig(**common, head_dim=head_dim_or_default, sliding_window=None)
        arch = "MistralForCausalLM"
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, head_dim=head_dim_or_default, sliding_window=None,
                                         num_local_experts=4, num_experts_per_tok=2)
        arch = "MixtralForCausalLM"
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=head_dim_or_default, use_sliding_window=False,
                                          moe_intermediate_size=moe_width, num_experts=4, num_experts_per_tok=2,
                                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
        arch = "Qwen3MoeForCausalLM"
    elif family == "gemma2":
        # vLLM 0.26 loads Gemma 2 only with tied embeddings; every other layer is sliding (window
        # longer than any test sequence), attention and final logits soft-capped
        cfg = transformers.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=head_dim_or_default,
                                        hidden_activation="gelu_pytorch_tanh",
                                        query_pre_attn_scalar=head_dim_or_default,
                                        sliding_window=max_position_embeddings, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0)
        arch = "Gemma2ForCausalLM"
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True}, head_dim=head_dim_or_default,
            query_pre_attn_scalar=head_dim_or_default, sliding_window=max_position_embeddings,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        )
        arch = "Gemma3ForCausalLM"
    elif family == "phi3":
        _derived_head_dim(family, head_dim, hidden_size, num_heads)
        cfg, arch = transformers.Phi3Config(**common, sliding_window=None), "Phi3ForCausalLM"
    elif family == "granite":
        _derived_head_dim(family, head_dim, hidden_size, num_heads)
        cfg = transformers.GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5,
                                         attention_multiplier=1.0 / head_dim_or_default, logits_scaling=2.0)
        arch = "GraniteForCausalLM"
    elif family == "olmo2":
        _derived_head_dim(family, head_dim, hidden_size, num_heads)
        cfg, arch = transformers.Olmo2Config(**common), "Olmo2ForCausalLM"
    elif family == "gpt_oss":
        # vLLM hard-codes the RMSNorm eps (1e-5) and applies the sliding window to the even layers
        # (window longer than any test sequence); its attention has per-head sinks, its router and
        # projections biases. YaRN rope as in the released models (vLLM always builds YaRN), its
        # original context a 32nd of the model's so test sequences reach the interpolated positions.
        cfg = transformers.GptOssConfig(
            **{**common, "intermediate_size": moe_width, "rms_norm_eps": 1e-5}, head_dim=head_dim_or_default,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=max_position_embeddings,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": max(1, max_position_embeddings // 32)},
        )
        arch = "GptOssForCausalLM"
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    cfg.architectures = [arch]
    return cfg


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    init_std: float = 0.1,
    head_std: float = 0.5,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random-weight checkpoint + tokenizer to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = _config(
        family, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, init_std=init_std,
        tie_word_embeddings=tie_word_embeddings, bos_id=ids["<s>"], eos_id=ids["</s>"], pad_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:  # norms stay at one, biases small
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            else:
                # The output head gets the larger scale; with tied embeddings the shared matrix
                # (named embed_tokens, lm_head is deduplicated away) is that head.
                is_head = name.startswith("lm_head") or (cfg.tie_word_embeddings and "embed_tokens" in name)
                std = head_std if is_head else init_std
                if is_head and cfg.model_type.startswith("gemma"):
                    # Gemma ties the head to the input embedding and scales that by sqrt(hidden): at
                    # the full head scale the stream would dwarf every attention output (post-norms
                    # fix their size), and no steering could move the greedy tokens
                    std = head_std / 5
                param.copy_(std * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def write_config_only(out_dir: str | Path, family: str = "llama", *, tokenizer: bool = False, **shape) -> Path:
    """Only config.json: for vLLM's ``load_format="dummy"`` on larger shapes (benchmarks).

    ``shape`` takes ``build_tiny_checkpoint``'s shape arguments (vocab_size, hidden_size, num_layers,
    num_heads, num_kv_heads, head_dim, intermediate_size, max_position_embeddings, ...). Without a
    tokenizer, start vLLM with ``skip_tokenizer_init=True`` and token-id prompts; ``tokenizer=True``
    also writes the BPE tokenizer (its vocabulary may be smaller than ``vocab_size``; the special
    tokens keep ids 0/1/2 = pad/bos/eos, as in the config).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    defaults = dict(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=None,
                    intermediate_size=1408, max_position_embeddings=4096, init_std=0.02,
                    tie_word_embeddings=False, bos_id=1, eos_id=2, pad_id=0)
    defaults.update(shape)
    _config(family, **defaults).save_pretrained(str(out))
    if tokenizer:
        build_tokenizer(defaults["vocab_size"]).save_pretrained(str(out))
    return out


def cached_tiny_checkpoint(family: str = "llama", cache_root: str | Path | None = None, **kwargs) -> Path:
    """``build_tiny_checkpoint`` into ``cache_root/<family>-<hash of args>``, only when missing."""
    root = Path(cache_root or os.environ.get("VLLM_STEER_CACHE") or Path.home() / ".cache" / "vllm-steer" / "models")
    # _BUILDER_VERSION: bump when the builder's output changes, so stale cached folders are not reused.
    key_args = {"family": family, "builder": _BUILDER_VERSION, **kwargs}
    key = hashlib.sha256(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:12]
    target = root / f"{family}-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
    try:
        build_tiny_checkpoint(tmp, family, **kwargs)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
