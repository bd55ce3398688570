"""Plain-torch reference for the fused steer+probe op, and the argument checks it shares with the
Triton kernel.

The op works on one layer's attention output (the input of ``o_proj``), in place::

    for every token t with slot s = token_slots[t] != 0:
        probe_out[t, h] = sum_d attn_out[t, h*D + d] * probe_rows[s, h*D + d]   # before the add
        attn_out[t]    += token_scales[t] * steer_rows[s]                       # add in float32
    for every token t with slot 0:
        attn_out[t] is left alone, probe_out[t, :] = 0

``token_scales`` is optional (None: every scale is 1); it lets tokens that share a slot be steered
at different strengths (FASB's per-step strength). Slot 0 means "this token is not steered". Row 0 of the tables is all zeros by contract, but slot-0
tokens never read it: their ``attn_out`` row is neither read nor written.

The slot values themselves are not range-checked (that would need a device sync on every call);
the caller guarantees ``0 <= token_slots[t] < S`` for ``t < T``.
"""

from __future__ import annotations

import torch

ATTN_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)


def _check_row_table(name: str, table: torch.Tensor, width: int, device: torch.device) -> None:
    """A [S, width] float table whose rows may be a column-slice view of a wider table."""
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2 or table.shape[1] != width:
        raise ValueError(
            f"{name}: expected shape [S, num_heads * head_dim] = [S, {width}], got {list(table.shape)}"
        )
    if table.shape[0] < 1:
        raise ValueError(f"{name}: needs at least one row (row 0 is the no-op slot), got 0 rows")
    if table.dtype not in TABLE_DTYPES:
        raise ValueError(f"{name}: dtype must be one of {TABLE_DTYPES}, got {table.dtype}")
    if table.stride(1) != 1:
        raise ValueError(f"{name}: columns must be contiguous (stride(1) == 1), got stride {table.stride()}")
    if table.device != device:
        raise ValueError(f"{name}: must be on {device} like attn_out, got {table.device}")


def validate_steer_probe_args(
    attn_out: torch.Tensor,
    token_slots: torch.Tensor,
    steer_rows: torch.Tensor,
    probe_rows: torch.Tensor | None,
    probe_out: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    token_scales: torch.Tensor | None = None,
) -> bool:
    """Check the arguments of the steer+probe op; return whether probing is requested.

    Raises ``ValueError`` naming the offending argument. Shared by the reference and the Triton
    implementation so both accept exactly the same inputs.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
    width = num_heads * head_dim

    if not isinstance(attn_out, torch.Tensor):
        raise ValueError(f"attn_out: expected a torch.Tensor, got {type(attn_out).__name__}")
    if attn_out.dim() != 2 or attn_out.shape[1] != width:
        raise ValueError(
            f"attn_out: expected shape [T, num_heads * head_dim] = [T, {width}], got {list(attn_out.shape)}"
        )
    if attn_out.dtype not in ATTN_OUT_DTYPES:
        raise ValueError(f"attn_out: dtype must be one of {ATTN_OUT_DTYPES}, got {attn_out.dtype}")
    if attn_out.stride(1) != 1:
        raise ValueError(f"attn_out: columns must be contiguous (stride(1) == 1), got stride {attn_out.stride()}")
    num_tokens = attn_out.shape[0]
    device = attn_out.device

    if not isinstance(token_slots, torch.Tensor):
        raise ValueError(f"token_slots: expected a torch.Tensor, got {type(token_slots).__name__}")
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots: expected a 1-D tensor, got shape {list(token_slots.shape)}")
    if token_slots.dtype not in SLOT_DTYPES:
        raise ValueError(f"token_slots: dtype must be torch.int32 or torch.int64, got {token_slots.dtype}")
    if token_slots.shape[0] < num_tokens:
        raise ValueError(
            f"token_slots: too short, has {token_slots.shape[0]} entries but attn_out has {num_tokens} tokens"
        )
    if token_slots.device != device:
        raise ValueError(f"token_slots: must be on {device} like attn_out, got {token_slots.device}")

    _check_row_table("steer_rows", steer_rows, width, device)

    if token_scales is not None:
        if not isinstance(token_scales, torch.Tensor):
            raise ValueError(f"token_scales: expected a torch.Tensor, got {type(token_scales).__name__}")
        if token_scales.dim() != 1 or token_scales.dtype != torch.float32:
            raise ValueError(
                f"token_scales: expected a 1-D float32 tensor, got shape {list(token_scales.shape)} "
                f"and dtype {token_scales.dtype}"
            )
        if token_scales.shape[0] < num_tokens:
            raise ValueError(
                f"token_scales: too short, has {token_scales.shape[0]} entries but attn_out has {num_tokens} tokens"
            )
        if token_scales.device != device:
            raise ValueError(f"token_scales: must be on {device} like attn_out, got {token_scales.device}")

    if probe_rows is None:
        if probe_out is not None:
            raise ValueError("probe_out: given without probe_rows; pass both or neither")
        return False
    if probe_out is None:
        raise ValueError("probe_rows: given without probe_out; pass both or neither")

    _check_row_table("probe_rows", probe_rows, width, device)
    if probe_rows.shape[0] != steer_rows.shape[0]:
        raise ValueError(
            f"probe_rows: has {probe_rows.shape[0]} rows but steer_rows has {steer_rows.shape[0]}; "
            "both are indexed by the same slots"
        )

    if not isinstance(probe_out, torch.Tensor):
        raise ValueError(f"probe_out: expected a torch.Tensor, got {type(probe_out).__name__}")
    if probe_out.dtype != torch.float32:
        raise ValueError(f"probe_out: dtype must be torch.float32, got {probe_out.dtype}")
    if probe_out.dim() != 2 or probe_out.shape[1] != num_heads:
        raise ValueError(
            f"probe_out: expected shape [T_max, num_heads] = [T_max, {num_heads}], got {list(probe_out.shape)}"
        )
    if probe_out.shape[0] < num_tokens:
        raise ValueError(
            f"probe_out: too short, has {probe_out.shape[0]} rows but attn_out has {num_tokens} tokens"
        )
    if probe_out.stride(1) != 1:
        raise ValueError(f"probe_out: columns must be contiguous (stride(1) == 1), got stride {probe_out.stride()}")
    if probe_out.device != device:
        raise ValueError(f"probe_out: must be on {device} like attn_out, got {probe_out.device}")
    return True


def steer_probe_reference(
    attn_out: torch.Tensor,
    token_slots: torch.Tensor,
    steer_rows: torch.Tensor,
    probe_rows: torch.Tensor | None,
    probe_out: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    token_scales: torch.Tensor | None = None,
) -> None:
    """Steer (and optionally probe) ``attn_out`` in place with plain torch ops; see the module doc.

    Slow (it syncs to find the steered tokens); meant as the ground truth for the Triton kernel and
    as a fallback where Triton is unavailable.
    """
    probing = validate_steer_probe_args(
        attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim, token_scales
    )
    num_tokens = attn_out.shape[0]
    if num_tokens == 0:
        return

    slots = token_slots[:num_tokens].long()
    steered_tokens = torch.nonzero(slots).squeeze(1)
    if probing:
        probe_out[:num_tokens].zero_()  # slot-0 tokens report 0; steered ones are overwritten below
    if steered_tokens.numel() == 0:
        return

    steered_slots = slots.index_select(0, steered_tokens)
    x = attn_out.index_select(0, steered_tokens).float()  # the activations before steering, [A, H*D]
    if probing:
        probe_weights = probe_rows.index_select(0, steered_slots).float()
        per_head = torch.mul(x, probe_weights).view(-1, num_heads, head_dim).sum(dim=-1)
        probe_out.index_copy_(0, steered_tokens, per_head)
    add = steer_rows.index_select(0, steered_slots).float()
    if token_scales is not None:
        add = add * token_scales.index_select(0, steered_tokens).unsqueeze(1)
    attn_out.index_copy_(0, steered_tokens, (x + add).to(attn_out.dtype))
