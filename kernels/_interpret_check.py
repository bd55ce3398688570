"""Compare ``steer_probe_triton`` against ``steer_probe_reference`` on random CPU cases.

Run as ``TRITON_INTERPRET=1 python -m vllm_steer_kernels._interpret_check``: prints one JSON line
per case, then one line with the messages of the kernel wrapper's argument checks. The test suite runs it in a subprocess so that the pytest process never imports Triton
in interpreter mode (other tests import vLLM, which imports Triton normally).

Every case poisons row 0 of the steering/probe tables (the no-op slot, all zeros by contract) so
that a kernel which reads row 0 for slot-0 tokens, instead of skipping them, shows up as a change
in their ``attn_out`` rows or a nonzero probe.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from .steer_probe_reference import steer_probe_reference

_POISON = 1000.0  # value written into row 0 of the tables; must never reach the output
_SENTINEL = -777.0  # value of probe_out rows beyond T; must survive untouched
VALIDATION_RECORD = "__triton_validation__"  # name of the last JSON line: argument-check messages


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    num_heads: int
    head_dim: int
    num_slots: int = 5
    dtype: torch.dtype = torch.float32
    table_dtype: torch.dtype | None = None  # None: same as dtype
    slot_dtype: torch.dtype = torch.int64
    probe: bool = True
    steered_fraction: float = 0.6  # fraction of tokens with a nonzero slot
    extra_slots: int = 0  # token_slots / probe_out longer than T by this much
    tp_size: int = 1  # >1: tables are a column slice (rank tp_rank) of a tp_size-times wider table
    tp_rank: int = 0
    scaled: bool = False  # pass per-token scales (random, some zero and negative)
    seed: int = 0


CASES = [
    Case("h1_d16_f32", 8, 1, 16),
    Case("h4_d64_f32", 12, 4, 64),
    Case("h6_d80_f32", 10, 6, 80, seed=1),
    Case("h32_d128_f32", 6, 32, 128, seed=2),
    Case("h4_d128_f32_noprobe", 9, 4, 128, probe=False, seed=3),
    Case("h6_d80_bf16", 10, 6, 80, dtype=torch.bfloat16, seed=4),
    Case("h32_d128_bf16_noprobe", 6, 32, 128, dtype=torch.bfloat16, probe=False, seed=5),
    Case("h4_d64_bf16_f32tables", 8, 4, 64, dtype=torch.bfloat16, table_dtype=torch.float32, seed=6),
    Case("h4_d64_f16", 8, 4, 64, dtype=torch.float16, seed=7),
    Case("h4_d64_int32_slots", 12, 4, 64, slot_dtype=torch.int32, seed=8),
    Case("h4_d64_int32_slots_noprobe", 12, 4, 64, slot_dtype=torch.int32, probe=False, seed=9),
    Case("tp_rank1_of2_h4_d64", 10, 4, 64, tp_size=2, tp_rank=1, seed=10),
    Case("tp_rank1_of2_h6_d80_bf16", 10, 6, 80, dtype=torch.bfloat16, tp_size=2, tp_rank=1, seed=11),
    Case("tp_rank0_of4_h4_d64_noprobe", 10, 4, 64, tp_size=4, tp_rank=0, probe=False, seed=12),
    Case("empty_batch", 0, 4, 64, extra_slots=8, seed=13),
    Case("empty_batch_noprobe", 0, 4, 64, extra_slots=8, probe=False, seed=14),
    Case("all_steered", 16, 4, 64, steered_fraction=1.0, seed=15),
    Case("all_noop", 8, 4, 64, steered_fraction=0.0, seed=16),
    Case("mixed_mostly_noop", 24, 6, 64, steered_fraction=0.2, seed=17),
    Case("buffers_longer_than_T", 7, 4, 64, extra_slots=9, seed=18),
    Case("h4_d64_f32_scaled", 12, 4, 64, scaled=True, seed=20),
    Case("h6_d80_bf16_scaled_noprobe", 10, 6, 80, dtype=torch.bfloat16, probe=False, scaled=True, seed=21),
    Case("buffers_longer_than_T_int32_bf16", 7, 6, 80, dtype=torch.bfloat16,
         slot_dtype=torch.int32, extra_slots=9, seed=19),
]


def _make_slots(case: Case, gen: torch.Generator) -> torch.Tensor:
    length = case.num_tokens + case.extra_slots
    nonzero = torch.randint(1, case.num_slots, (length,), generator=gen)
    steered = torch.rand(length, generator=gen) < case.steered_fraction
    if case.num_tokens > 0 and 0.0 < case.steered_fraction < 1.0:
        steered[0], steered[case.num_tokens - 1] = True, False  # both kinds present
    slots = torch.where(steered, nonzero, torch.zeros_like(nonzero))
    # Entries beyond T are garbage from earlier steps: make them nonzero so reading them shows.
    slots[case.num_tokens:] = nonzero[case.num_tokens:]
    return slots.to(case.slot_dtype)


def _make_table(case: Case, width: int, gen: torch.Generator) -> torch.Tensor:
    table_dtype = case.table_dtype or case.dtype
    full = torch.randn(case.num_slots, width * case.tp_size, generator=gen)
    full[0] = _POISON  # the no-op row; by contract zeros, poisoned here to catch stray reads
    full = full.to(table_dtype)
    start = case.tp_rank * width
    return full[:, start:start + width]  # a view: stride(0) == width * tp_size


def run_case(case: Case) -> dict:
    from .steer_probe_triton import steer_probe_triton

    gen = torch.Generator().manual_seed(case.seed)
    width = case.num_heads * case.head_dim
    attn_out = torch.randn(case.num_tokens, width, generator=gen).to(case.dtype)
    token_slots = _make_slots(case, gen)
    steer_rows = _make_table(case, width, gen)
    probe_rows = _make_table(case, width, gen) if case.probe else None
    probe_out = None
    if case.probe:
        probe_out = torch.full((case.num_tokens + case.extra_slots, case.num_heads), _SENTINEL)

    token_scales = None
    if case.scaled:
        token_scales = 4 * torch.rand(case.num_tokens + case.extra_slots, generator=gen) - 2
        token_scales[: case.num_tokens : 3] = 1.0  # some plain, the others in [-2, 2)

    ref_attn, kern_attn = attn_out.clone(), attn_out.clone()
    ref_probe = probe_out.clone() if probe_out is not None else None
    kern_probe = probe_out.clone() if probe_out is not None else None
    steer_probe_reference(ref_attn, token_slots, steer_rows, probe_rows, ref_probe,
                          case.num_heads, case.head_dim, token_scales)
    steer_probe_triton(kern_attn, token_slots, steer_rows, probe_rows, kern_probe,
                       case.num_heads, case.head_dim, token_scales)

    noop = token_slots[:case.num_tokens] == 0
    steered = ~noop
    attn_err = (kern_attn.float() - ref_attn.float()).abs()
    result = {
        "name": case.name,
        "dtype": str(case.dtype).removeprefix("torch."),
        "slot_dtype": str(case.slot_dtype).removeprefix("torch."),
        "probe": case.probe,
        "num_tokens": case.num_tokens,
        "num_heads": case.num_heads,
        "head_dim": case.head_dim,
        "tp_size": case.tp_size,
        "tp_rank": case.tp_rank,
        "extra_slots": case.extra_slots,
        "scaled": case.scaled,
        "num_steered": int(steered.sum()),
        "num_noop": int(noop.sum()),
        "attn_max_abs_err": float(attn_err.max()) if attn_err.numel() else 0.0,
        "attn_ref_max_abs": float(ref_attn.float().abs().max()) if ref_attn.numel() else 0.0,
        # The add really happened (guards against a reference and kernel that both do nothing).
        "steered_rows_changed": bool((kern_attn[steered] != attn_out[steered]).any(dim=1).all()),
        "noop_rows_bit_identical": torch.equal(kern_attn[noop], attn_out[noop]),
        "probe_max_abs_err": None,
        "probe_ref_max_abs": None,
        "probe_noop_rows_zero": None,
        "probe_rows_beyond_T_untouched": None,
    }
    if case.probe:
        t = case.num_tokens
        probe_err = (kern_probe[:t] - ref_probe[:t]).abs()
        result["probe_max_abs_err"] = float(probe_err.max()) if probe_err.numel() else 0.0
        result["probe_ref_max_abs"] = float(ref_probe[:t].abs().max()) if probe_err.numel() else 0.0
        result["probe_noop_rows_zero"] = bool((kern_probe[:t][noop] == 0).all())
        result["probe_rows_beyond_T_untouched"] = torch.equal(kern_probe[t:], probe_out[t:])
    return result


def triton_validation_messages() -> list[str]:
    """The ValueError messages ``steer_probe_triton`` raises for a few bad argument sets."""
    from .steer_probe_triton import steer_probe_triton

    attn_out = torch.zeros(4, 8)
    slots = torch.zeros(4, dtype=torch.int64)
    rows = torch.zeros(3, 8)
    bad_calls = [
        (attn_out, slots[:2], rows, None, None, 2, 4),  # token_slots too short
        (attn_out, slots.float(), rows, None, None, 2, 4),  # token_slots wrong dtype
        (attn_out, slots, torch.zeros(3, 6), None, None, 2, 4),  # steer_rows wrong width
        (attn_out, slots, rows, rows, None, 2, 4),  # probe_rows without probe_out
        (attn_out, slots, rows, rows, torch.zeros(4, 2, dtype=torch.float64), 2, 4),  # probe_out dtype
        (attn_out, slots, rows, None, None, 2, 4, torch.ones(2)),  # token_scales too short
    ]
    messages = []
    for args in bad_calls:
        try:
            steer_probe_triton(*args)
        except ValueError as err:
            messages.append(str(err))
        else:
            messages.append("<no error>")
    return messages


def main() -> int:
    # Must happen before Triton is imported; this package's __init__ does not import it.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "1"
    for case in CASES:
        print(json.dumps(run_case(case)), flush=True)
    print(json.dumps({"name": VALIDATION_RECORD, "messages": triton_validation_messages()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
