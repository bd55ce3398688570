"""Independent reference for activation capture: plain HF transformers with forward hooks.

For each layer: the input of ``self_attn.o_proj`` (per-head attention outputs) and the decoder
layer's output (the residual stream, HF ``hidden_states[layer + 1]``), for one token sequence.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_layer_activations(model, token_ids):
    """Returns (heads [T, L, H*D], stream [T, L, hidden]) for one sequence, float32."""
    heads, stream = {}, {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=index: heads.__setitem__(i, args[0][0].float().clone())))
        handles.append(layer.register_forward_hook(
            lambda m, args, out, i=index: stream.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0].float().clone())))
    try:
        model(input_ids=torch.tensor([list(token_ids)]))
    finally:
        for h in handles:
            h.remove()
    n = len(model.model.layers)
    return torch.stack([heads[i] for i in range(n)], dim=1), torch.stack([stream[i] for i in range(n)], dim=1)


def assert_captures_match(captured, items, model, num_heads: int, head_dim: int) -> None:
    """``captured`` (per item: ``heads_at`` / ``residual_at`` [positions, L, ...] at the item's
    ``positions``, ``heads_mean`` / ``residual_mean`` over tokens ``mean_from``..end) equals these
    hooks' activations of each item's ``token_ids`` (float32, tight tolerance)."""
    for i, item in enumerate(items):
        heads, stream = hf_layer_activations(model, item.token_ids)
        for p, pos in enumerate(item.positions):
            torch.testing.assert_close(captured.heads_at[i, p], heads[pos].view(-1, num_heads, head_dim),
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(captured.residual_at[i, p], stream[pos], rtol=1e-4, atol=1e-4)
        lo = item.mean_from
        torch.testing.assert_close(captured.heads_mean[i], heads[lo:].mean(0).view(-1, num_heads, head_dim),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(captured.residual_mean[i], stream[lo:].mean(0), rtol=1e-4, atol=1e-4)
