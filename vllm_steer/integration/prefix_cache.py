"""Keep steered KV out of unsteered requests' prefix-cache hits.

vLLM hashes a KV block from its tokens (plus LoRA, multimodal and cache-salt keys). A block whose
span reaches a request's first steered position holds KV computed under steering, so it gets an
extra key naming the spec and that position: steered blocks are shared only between requests that
steer them identically, and blocks wholly before the steered span stay shared with everyone.

FASB requests compute vanilla KV until they backtrack; the backtrack then sets the key (strength and
first steered position) with ``set_steering_cache_key`` and re-hashes the blocks from there on.
"""

from __future__ import annotations

from vllm_steer.errors import SteeringError
from vllm_steer.integration.patching import patch
from vllm_steer.spec import parse_spec

_SPEC_ATTR = "_vllm_steer_cache_key"


def _steering_cache_key(request) -> tuple[str, int] | None:
    cached = getattr(request, _SPEC_ATTR, False)
    if cached is not False:
        return cached
    key = None
    params = getattr(request, "sampling_params", None)
    if params is not None and params.extra_args:
        try:
            spec = parse_spec(params.extra_args)
        except SteeringError:
            spec = None
        if spec is not None and spec.active:
            start = spec.steer_start(request.num_prompt_tokens)
            if start is not None:
                key = (spec.cache_key(), start)
    setattr(request, _SPEC_ATTR, key)
    return key


def set_steering_cache_key(request, key: tuple[str, int]) -> None:
    """From now on, blocks of ``request`` reaching position ``key[1]`` are keyed by ``key``."""
    setattr(request, _SPEC_ATTR, key)


def _generate_block_hash_extra_keys(original, request, start_token_idx, end_token_idx, *args, **kwargs):
    extra_keys, next_mm_idx = original(request, start_token_idx, end_token_idx, *args, **kwargs)
    key = _steering_cache_key(request)
    if key is not None and end_token_idx > key[1]:
        extra_keys = (*(extra_keys or ()), ("vllm_steer", key[0], key[1]))
    return extra_keys, next_mm_idx


def install() -> None:
    from vllm.v1.core import kv_cache_utils

    patch(kv_cache_utils, "generate_block_hash_extra_keys")(_generate_block_hash_extra_keys)
