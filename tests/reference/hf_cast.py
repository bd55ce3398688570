"""Independent reference for conditional activation steering (CAST), in plain HF transformers.

Two passes, written from the method's formulas:

1. The prompt alone, unsteered, with ``output_hidden_states``: ``hidden_states[L]`` is the input of
   decoder layer ``L``; its mean over the prompt's tokens is ``h``. With the unit condition direction
   ``v``, the similarity is ``cos(h, tanh((h . v) v))``; the condition holds when it is above (or
   below) the threshold.
2. Greedy generation: with the behaviour's hooks (``hf_composed``) when the condition holds, without
   any otherwise.
"""

from __future__ import annotations

import torch

from reference.hf_composed import composed_generate
from reference.hf_steering import greedy_tokens


@torch.no_grad()
def condition_similarity(model, prompt_ids, direction, layer: int) -> float:
    ids = torch.tensor([[int(t) for t in prompt_ids]], device=model.device)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]  # [T, hidden]
    h = hidden.double().mean(0)
    v = direction.double() / direction.double().norm()
    squashed = torch.tanh(torch.dot(h, v) * v)
    return float(torch.dot(h, squashed) / (h.norm() * squashed.norm()).clamp(min=1e-8))


def condition_holds(similarity: float, threshold: float, comparison: str) -> bool:
    return similarity > threshold if comparison == "above" else similarity < threshold


def cast_generate(model, prompt_ids, max_new_tokens, members, *, direction, layer, threshold, comparison):
    """(tokens, whether the condition held) for ``prompt_ids`` under ``members`` gated by the condition."""
    holds = condition_holds(condition_similarity(model, prompt_ids, direction, layer), threshold, comparison)
    if not holds:
        return greedy_tokens(model, prompt_ids, max_new_tokens, {"offset": 0}), False
    return composed_generate(model, prompt_ids, max_new_tokens, members), True
