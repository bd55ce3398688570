"""Shared fixtures: tiny checkpoints built offline, packs that fit them, and vLLM engines.

Engines take seconds to start, so each test module shares one per model (module-scoped).
"""

from __future__ import annotations

import gc
import os
import random
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from vllm_steer.models.tiny_checkpoint import FAMILIES, cached_tiny_checkpoint


def truthfulqa_dir() -> Path:
    """TruthfulQA from the workplace's shared data (``../shared`` beside the checkout), never from git.

    ``VLLM_STEER_TRUTHFULQA`` overrides the location."""
    path = Path(os.environ.get("VLLM_STEER_TRUTHFULQA")
                or Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa")
    if not (path / "mc_task.json").is_file():
        raise FileNotFoundError(
            f"TruthfulQA data not found at {path}: put the shared folder beside the checkout "
            "or set VLLM_STEER_TRUTHFULQA"
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The HF references run in this process beside vLLM's engine processes on a 2-core machine:
    one torch thread here avoids oversubscription (several times faster decoding)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_cache):
    """``tiny_model(family)`` -> path of that family's tiny checkpoint (built once per session)."""

    def get(family: str = "llama"):
        return cached_tiny_checkpoint(family, cache_root=model_cache)

    return get


def make_llm(model_path, packs=None, **overrides):
    """A vLLM engine on a tiny model; ``packs`` (a list of pack files) turns the plugin on."""
    from vllm import LLM

    kwargs = dict(
        model=str(model_path),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        seed=0,
        gpu_memory_utilization=0.5,
    )
    if packs is not None:
        kwargs["additional_config"] = {"steering": {"packs": [str(p) for p in packs]}}
    kwargs.update(overrides)
    return LLM(**kwargs)


def close_llm(llm) -> None:
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()


def random_prompts(n: int, vocab_size: int, seed: int, min_len: int = 3, max_len: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)
    ]


def greedy(max_tokens: int = 12, steering=None, **kw):
    from vllm import SamplingParams

    extra = {"steering": steering} if steering is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def fitted_probe_pack(model_path, name: str, *, num_heads: int = 6, num_sequences: int = 24, seed: int = 0):
    """A pack fitted by the fit library on the tiny model's own activations (no engine): per-head
    probes trained on every token of random sequences, labelled by whether the token id is in the
    lower half of the vocabulary, the top heads kept with mass-mean directions and sigma. Its probe
    scores vary from token to token like a real pack's, so FASB fires, or not, by the text."""
    import torch
    from transformers import AutoModelForCausalLM

    from reference.hf_capture import hf_layer_activations
    from vllm_steer.fit.directions import mass_mean_directions, projection_sigma
    from vllm_steer.fit.probes import train_head_probes
    from vllm_steer.pack import PackManifest, build_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    shape = shape_of_checkpoint(model_path)
    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    features, labels = [], []
    for seq in random_prompts(num_sequences, vocab, seed=seed, min_len=12, max_len=24):
        heads, _ = hf_layer_activations(hf, seq)
        features.append(heads.reshape(len(seq), shape.num_layers, shape.num_heads, shape.head_dim))
        labels += [int(t < vocab // 2) for t in seq]
    features = torch.cat(features)
    n = features.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, val = order[: n * 3 // 4], order[n * 3 // 4 :]
    probes = train_head_probes(features, labels, train, val, progress=False, num_threads=1)
    chosen = probes.top_k(num_heads)
    layers = torch.tensor([l for l, _ in chosen])
    head_idx = torch.tensor([h for _, h in chosen])
    directions = mass_mean_directions(features, labels, train)
    sigma = projection_sigma(features[train], directions)
    manifest = PackManifest(
        name=name, model=shape, methods=["iti"], num_heads_selected=num_heads, residual_layers=[],
        has_probes=True, metadata={"source": "fitted in tests", "seed": seed},
    )
    order_heads = torch.argsort(layers * shape.num_heads + head_idx)
    layers, head_idx = layers[order_heads], head_idx[order_heads]
    return build_pack(manifest, {
        "heads.layer": layers,
        "heads.head": head_idx,
        "heads.direction": directions[layers, head_idx],
        "heads.sigma": sigma[layers, head_idx],
        "residual.layer": torch.zeros(0, dtype=torch.int64),
        "residual.vector": torch.zeros(0, shape.hidden_size),
        "probes.weight": probes.weight[layers, head_idx],
        "probes.bias": probes.bias[layers, head_idx],
    })
