"""The torch custom op the model graph calls: ``torch.ops.vllm_steer.steer_probe``.

Registered with a fake (meta) implementation so torch.compile traces it as one opaque node that
mutates its inputs in place, and CUDA graphs capture its kernel like any other. Every argument is
a persistent buffer whose address never changes; per-step data (which slot each token uses) is
written into those buffers in place, so the graph stays the same every step.

Dispatch: CUDA tensors go to the fused Triton kernel, everything else to the torch reference.
"""

from __future__ import annotations

import torch

from vllm_steer_kernels import steer_probe_reference

_triton_impl = None


def _steer_probe_cuda(*args) -> None:
    global _triton_impl
    if _triton_impl is None:
        from vllm_steer_kernels import steer_probe_triton

        _triton_impl = steer_probe_triton
    _triton_impl(*args)


@torch.library.custom_op("vllm_steer::steer_probe", mutates_args=("attn_out", "probe_out"))
def steer_probe(
    attn_out: torch.Tensor,
    token_slots: torch.Tensor,
    steer_rows: torch.Tensor,
    probe_rows: torch.Tensor | None,
    probe_out: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    token_scales: torch.Tensor | None = None,
) -> None:
    """In place: ``attn_out[t] += token_scales[t] * steer_rows[token_slots[t]]``; probe dots into
    ``probe_out``."""
    args = (attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim, token_scales)
    if attn_out.is_cuda:
        _steer_probe_cuda(*args)
    else:
        steer_probe_reference(*args)


@steer_probe.register_fake
def _steer_probe_fake(attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim,
                      token_scales=None) -> None:
    return None


@torch.library.custom_op("vllm_steer::l2s_predict", mutates_args=("out_rows",))
def l2s_predict(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    out_rows: torch.Tensor,
) -> None:
    """L2S in the prefill step: for each i with ``slots[i] != 0``,
    ``out_rows[slots[i]] += scales[i] * (w_out @ tanh(w_in @ x + b_in))`` with
    ``x = hidden[rows[i]] + residual[rows[i]]`` (the residual stream after the layer). The row holds
    what the slot's other steering adds at that layer (zero without a composition), so the sum is
    the slot's row. Fixed shapes, no host sync: inactive entries (slot 0) rewrite row 0 with its own
    value."""
    x = hidden[rows].float() + residual[rows].float()
    y = torch.tanh(x @ w_in.t() + b_in) @ w_out.t()
    active = (slots != 0).unsqueeze(1)
    current = out_rows[slots]
    out_rows.index_copy_(0, slots, torch.where(active, current + scales.unsqueeze(1) * y, current))


@l2s_predict.register_fake
def _l2s_predict_fake(hidden, residual, rows, slots, scales, w_in, b_in, w_out, out_rows) -> None:
    return None


@torch.library.custom_op("vllm_steer::condition_gate", mutates_args=("sums", "gates", "head_rows", "residual_rows"))
def condition_gate(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    token_rows: torch.Tensor,
    sums: torch.Tensor,
    finish_rows: torch.Tensor,
    finish_slots: torch.Tensor,
    finish_counts: torch.Tensor,
    finish_thresholds: torch.Tensor,
    finish_above: torch.Tensor,
    direction: torch.Tensor,
    gates: torch.Tensor,
    head_rows: torch.Tensor,
    residual_rows: torch.Tensor,
) -> None:
    """CAST's condition in the prefill forward, after the decoder layer before the condition layer.

    ``x = hidden + residual`` is the stream entering the condition layer. Each token ``t`` adds
    ``x[t]`` to its request's running sum ``sums[token_rows[t]]`` (row 0 collects the tokens of no
    condition and is never read). For each entry ``i`` with ``finish_slots[i] != 0`` (a request whose
    last prompt token is in this step), the prompt's mean ``m = sums[finish_rows[i]] / finish_counts[i]``
    gives the similarity ``cos(m, tanh((m . v) v))``; the gate is 1 when it is above (``finish_above``)
    or below the entry's threshold, else 0. It goes to ``gates[finish_rows[i]]`` and multiplies the
    request's steering rows at every layer (``head_rows[:, slot]``, ``residual_rows[:, slot]``), so the
    layers after this one in the same forward, and every later step, steer it only when the condition
    holds. Fixed shapes, no host sync: inactive entries use row 0 and slot 0 (whose rows are zero)."""
    x = hidden.float() + residual.float()
    sums.index_add_(0, token_rows[: x.shape[0]], x)
    mean = sums[finish_rows] / finish_counts.clamp(min=1.0).unsqueeze(1)
    v = direction.float()
    projected = torch.tanh((mean @ v).unsqueeze(1) * v.unsqueeze(0))
    similarity = torch.nn.functional.cosine_similarity(mean, projected, dim=-1)
    holds = torch.where(finish_above, similarity > finish_thresholds, similarity < finish_thresholds)
    gate = holds.float()
    gates.index_copy_(0, finish_rows, gate)
    sums[0].zero_()  # the dump row, so it never overflows
    for rows in (head_rows, residual_rows):
        if rows.shape[0]:
            rows.index_copy_(1, finish_slots, rows.index_select(1, finish_slots) * gate.view(1, -1, 1))


@condition_gate.register_fake
def _condition_gate_fake(hidden, residual, token_rows, sums, finish_rows, finish_slots, finish_counts,
                         finish_thresholds, finish_above, direction, gates, head_rows, residual_rows) -> None:
    return None
