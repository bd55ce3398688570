"""Fused Triton kernel for the steer+probe op (same semantics as ``steer_probe_reference``).

One program handles one token and a block of ``BLOCK_H`` of its heads, as a
``[BLOCK_H, BLOCK_D]`` tile of the token's attention-output row. A slot-0 token costs one slot
load (plus a zero store into ``probe_out`` when probing); its activations are never touched.

Importing this module imports Triton. To run on CPU (tests), set ``TRITON_INTERPRET=1`` before
Triton is first imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .steer_probe_reference import validate_steer_probe_args

# Aim for tiles of about this many elements: big enough to keep a program busy, small enough to
# keep the tile in registers (32 heads x 128 dims is split into two programs per token).
_TARGET_TILE_ELEMENTS = 2048


@triton.jit
def _steer_probe_kernel(
    attn_out_ptr,  # [T, H*D], steered in place
    token_slots_ptr,  # [>= T] int32/int64; 0 = leave the token alone
    steer_rows_ptr,  # [S, H*D] (row stride may exceed H*D: TP column slice)
    probe_rows_ptr,  # [S, H*D] or a placeholder when not probing
    probe_out_ptr,  # [>= T, H] float32 or a placeholder when not probing
    token_scales_ptr,  # [>= T] float32, or a placeholder when HAS_SCALES is False
    attn_out_row_stride,
    token_slots_stride,
    steer_row_stride,
    probe_row_stride,
    probe_out_row_stride,
    token_scales_stride,
    num_heads,
    HEAD_DIM: tl.constexpr,
    COMPUTE_PROBE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_mask = heads < num_heads

    slot = tl.load(token_slots_ptr + token * token_slots_stride).to(tl.int64)

    # Slot 0: nothing to steer. Report a zero probe and leave attn_out unread and unwritten.
    if slot == 0:
        if COMPUTE_PROBE:
            zeros = tl.zeros([BLOCK_H], dtype=tl.float32)
            tl.store(probe_out_ptr + token * probe_out_row_stride + heads, zeros, mask=head_mask)
        return

    # Column of each tile element within the H*D row: head h, dim d -> h * HEAD_DIM + d.
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    columns = heads[:, None] * HEAD_DIM + dims[None, :]  # [BLOCK_H, BLOCK_D]
    tile_mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]

    attn_out_row = attn_out_ptr + token * attn_out_row_stride
    x = tl.load(attn_out_row + columns, mask=tile_mask, other=0.0).to(tl.float32)

    if COMPUTE_PROBE:
        # Per-head dot product of the activations *before* steering with the probe direction.
        probe_weights = tl.load(
            probe_rows_ptr + slot * probe_row_stride + columns, mask=tile_mask, other=0.0
        ).to(tl.float32)
        per_head = tl.sum(x * probe_weights, axis=1)  # [BLOCK_H]
        tl.store(probe_out_ptr + token * probe_out_row_stride + heads, per_head, mask=head_mask)

    steer = tl.load(steer_rows_ptr + slot * steer_row_stride + columns, mask=tile_mask, other=0.0)
    steer = steer.to(tl.float32)
    if HAS_SCALES:
        steer = steer * tl.load(token_scales_ptr + token * token_scales_stride)
    steered = x + steer
    tl.store(attn_out_row + columns, steered.to(attn_out_ptr.dtype.element_ty), mask=tile_mask)


def _tile_shape(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): a whole padded head per row, as many heads as fit the target tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _TARGET_TILE_ELEMENTS // block_d))
    return block_h, block_d


def steer_probe_triton(
    attn_out: torch.Tensor,
    token_slots: torch.Tensor,
    steer_rows: torch.Tensor,
    probe_rows: torch.Tensor | None,
    probe_out: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    token_scales: torch.Tensor | None = None,
) -> None:
    """Steer (and optionally probe) ``attn_out`` in place with one fused Triton launch.

    Same arguments and semantics as ``steer_probe_reference``; see ``kernels.steer_probe_reference``.
    """
    probing = validate_steer_probe_args(
        attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim, token_scales
    )
    if attn_out.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attn_out: is on the CPU; the Triton kernel needs a GPU tensor "
            "(or TRITON_INTERPRET=1 set before Triton is imported)"
        )
    num_tokens = attn_out.shape[0]
    if num_tokens == 0:
        return

    if not probing:
        # Placeholders: the COMPUTE_PROBE=False variant never dereferences these.
        probe_rows, probe_out = steer_rows, attn_out
    has_scales = token_scales is not None
    scales = token_scales if has_scales else token_slots  # placeholder, never dereferenced

    block_h, block_d = _tile_shape(num_heads, head_dim)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _steer_probe_kernel[grid](
        attn_out,
        token_slots,
        steer_rows,
        probe_rows,
        probe_out,
        scales,
        attn_out.stride(0),
        token_slots.stride(0),
        steer_rows.stride(0),
        probe_rows.stride(0),
        probe_out.stride(0),
        scales.stride(0),
        num_heads,
        HEAD_DIM=head_dim,
        COMPUTE_PROBE=probing,
        HAS_SCALES=has_scales,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
