"""Tests of the fused steer+probe op: the Triton kernel against the torch reference, and the
reference against the definition.

The Triton kernel runs on CPU only under ``TRITON_INTERPRET=1``, which must be set before Triton
is imported. Other tests in the same session import vLLM (and with it Triton, normally), so this
process never imports Triton: the kernel runs in a subprocess (``vllm_steer_kernels._interpret_check``)
once per module, and the tests below assert on the JSON lines it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_steer_kernels.steer_probe_reference import steer_probe_reference

VALIDATION_RECORD = "__triton_validation__"  # mirrors _interpret_check.VALIDATION_RECORD

# --------------------------------------------------------------------------------------------
# Triton kernel vs reference, in an interpreter-mode subprocess
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpret_run() -> tuple[list[dict], dict]:
    """Run every case once through both implementations; return (case records, validation record)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_steer_kernels._interpret_check"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"interpreter check failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases = [r for r in records if r["name"] != VALIDATION_RECORD]
    validation = [r for r in records if r["name"] == VALIDATION_RECORD]
    assert len(validation) == 1, proc.stdout
    return cases, validation[0]


@pytest.fixture(scope="module")
def cases(interpret_run) -> list[dict]:
    return interpret_run[0]


def _attn_tolerance(record: dict) -> float:
    scale = max(1.0, record["attn_ref_max_abs"])
    if record["dtype"] == "bfloat16":
        # One bf16 ulp of the largest value. The add itself is exact in float32, but the
        # interpreter's float32->bfloat16 cast truncates where torch (and the GPU) round to nearest.
        return 2.0**-7 * scale
    if record["dtype"] == "float16":
        return 2.0**-10 * scale
    return 1e-5 * scale


def _probe_tolerance(record: dict) -> float:
    # Same inputs, float32 accumulation on both sides: only the summation order differs.
    return 1e-5 * max(1.0, record["probe_ref_max_abs"])


def test_cases_cover_the_required_shapes(cases):
    def seen(key):
        return {r[key] for r in cases}

    assert {1, 4, 6, 32} <= seen("num_heads")
    assert {16, 64, 80, 128} <= seen("head_dim")
    assert {"float32", "bfloat16"} <= seen("dtype")
    assert {"int32", "int64"} <= seen("slot_dtype")
    assert {True, False} <= seen("probe")
    assert any(r["tp_size"] == 2 and r["tp_rank"] == 1 for r in cases), "no TP rank-1-of-2 slice"
    assert any(r["num_tokens"] == 0 for r in cases), "no empty batch"
    assert {True, False} <= seen("scaled"), "no case with per-token scales"
    assert any(r["num_tokens"] > 0 and r["num_noop"] == 0 for r in cases), "no all-steered batch"
    assert any(r["num_noop"] >= 2 * r["num_steered"] > 0 for r in cases), "no mostly-no-op batch"
    assert any(r["extra_slots"] > 0 and r["probe"] and r["num_tokens"] > 0 for r in cases), (
        "no case with token_slots / probe_out longer than T"
    )


def test_attn_out_matches_reference(cases):
    bad = [
        (r["name"], r["attn_max_abs_err"], _attn_tolerance(r))
        for r in cases
        if not r["attn_max_abs_err"] <= _attn_tolerance(r)
    ]
    assert not bad, f"attn_out differs from the reference (case, err, tol): {bad}"


def test_steered_rows_actually_change(cases):
    assert [r["name"] for r in cases if not r["steered_rows_changed"]] == []


def test_noop_rows_stay_bit_identical(cases):
    # Row 0 of the tables is poisoned in every case, so adding it would show here.
    assert [r["name"] for r in cases if not r["noop_rows_bit_identical"]] == []


def test_probe_matches_reference(cases):
    probed = [r for r in cases if r["probe"]]
    assert probed
    bad = [
        (r["name"], r["probe_max_abs_err"], _probe_tolerance(r))
        for r in probed
        if not r["probe_max_abs_err"] <= _probe_tolerance(r)
    ]
    assert not bad, f"probe_out differs from the reference (case, err, tol): {bad}"


def test_probe_is_zero_for_noop_tokens(cases):
    assert [r["name"] for r in cases if r["probe"] and not r["probe_noop_rows_zero"]] == []


def test_probe_rows_beyond_num_tokens_untouched(cases):
    assert [r["name"] for r in cases if r["probe"] and not r["probe_rows_beyond_T_untouched"]] == []


def test_empty_batch_is_a_noop(cases):
    empty = [r for r in cases if r["num_tokens"] == 0]
    assert {r["probe"] for r in empty} == {True, False}
    for r in empty:
        assert r["attn_max_abs_err"] == 0.0
        if r["probe"]:
            assert r["probe_rows_beyond_T_untouched"], r["name"]


def test_triton_wrapper_validates_arguments(interpret_run):
    messages = interpret_run[1]["messages"]
    expected_names = ["token_slots", "token_slots", "steer_rows", "probe_rows", "probe_out", "token_scales"]
    assert len(messages) == len(expected_names)
    for message, name in zip(messages, expected_names):
        assert message.startswith(f"{name}:"), (name, message)


def test_package_import_does_not_import_triton():
    code = "import sys, vllm_steer_kernels; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Reference vs the definition, in-process (no Triton)
# --------------------------------------------------------------------------------------------


def _naive_steer_probe(attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim,
                       token_scales=None):
    """The op written out element by element, straight from its definition."""
    for t in range(attn_out.shape[0]):
        s = int(token_slots[t])
        if s == 0:
            if probe_out is not None:
                for h in range(num_heads):
                    probe_out[t, h] = 0.0
            continue
        before = attn_out[t].clone()
        if probe_out is not None:
            for h in range(num_heads):
                acc = torch.zeros((), dtype=torch.float32)
                for d in range(head_dim):
                    c = h * head_dim + d
                    acc += before[c].float() * probe_rows[s, c].float()
                probe_out[t, h] = acc
        scale = float(token_scales[t]) if token_scales is not None else 1.0
        for c in range(num_heads * head_dim):
            add = steer_rows[s, c].float() * scale if token_scales is not None else steer_rows[s, c].float()
            attn_out[t, c] = (before[c].float() + add).to(attn_out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_reference_matches_definition(dtype, probe, scaled):
    gen = torch.Generator().manual_seed(123)
    num_tokens, num_heads, head_dim, num_slots, tp_size = 7, 3, 5, 4, 2
    width = num_heads * head_dim

    def table():
        full = torch.randn(num_slots, tp_size * width, generator=gen)
        full[0] = 1000.0  # the no-op row: zeros by contract, poisoned to catch stray reads
        return full[:, width:2 * width]  # TP rank 1 of 2: a column-slice view

    attn_out = torch.randn(num_tokens, width, generator=gen).to(dtype)
    token_slots = torch.tensor([2, 0, 1, 3, 0, 0, 2, 1, 3], dtype=torch.int32)  # longer than T
    steer_rows = table()
    probe_rows = table() if probe else None
    probe_out = torch.full((num_tokens + 3, num_heads), -7.0) if probe else None

    token_scales = torch.tensor([0.5, 3.0, -1.0, 0.0, 2.0, 1.0, -0.25, 4.0, 9.0]) if scaled else None

    expected_attn = attn_out.clone()
    expected_probe = probe_out.clone() if probe else None
    _naive_steer_probe(expected_attn, token_slots, steer_rows, probe_rows, expected_probe,
                       num_heads, head_dim, token_scales)
    steer_probe_reference(attn_out, token_slots, steer_rows, probe_rows, probe_out, num_heads, head_dim,
                          token_scales)

    assert torch.equal(attn_out, expected_attn)  # one float32 add, same rounding: bit-exact
    if probe:
        torch.testing.assert_close(probe_out, expected_probe, rtol=1e-5, atol=1e-5)
        assert torch.equal(probe_out[num_tokens:], torch.full((3, num_heads), -7.0))
        assert torch.equal(probe_out[[1, 4, 5]], torch.zeros(3, num_heads))


def test_reference_empty_batch_touches_nothing():
    attn_out = torch.zeros(0, 8)
    probe_out = torch.full((4, 2), 5.0)
    steer_probe_reference(attn_out, torch.ones(4, dtype=torch.int64), torch.ones(3, 8), torch.ones(3, 8),
                          probe_out, 2, 4)
    assert torch.equal(probe_out, torch.full((4, 2), 5.0))


def _valid_args():
    return dict(
        attn_out=torch.zeros(4, 8),
        token_slots=torch.zeros(6, dtype=torch.int64),
        steer_rows=torch.zeros(3, 8),
        probe_rows=torch.zeros(3, 8),
        probe_out=torch.zeros(5, 2),
        num_heads=2,
        head_dim=4,
    )


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("num_heads", {"num_heads": 0}),
        ("head_dim", {"head_dim": 4.0}),
        ("attn_out", {"attn_out": torch.zeros(4, 6)}),
        ("attn_out", {"attn_out": torch.zeros(4, 8, dtype=torch.float64)}),
        ("attn_out", {"attn_out": torch.zeros(8, 4).t()}),
        ("token_slots", {"token_slots": torch.zeros(3, dtype=torch.int64)}),
        ("token_slots", {"token_slots": torch.zeros(6, dtype=torch.int16)}),
        ("token_slots", {"token_slots": torch.zeros(6)}),
        ("token_slots", {"token_slots": torch.zeros(2, 3, dtype=torch.int32)}),
        ("steer_rows", {"steer_rows": torch.zeros(3, 16)}),
        ("steer_rows", {"steer_rows": torch.zeros(0, 8)}),
        ("steer_rows", {"steer_rows": torch.zeros(3, 8, dtype=torch.int32)}),
        ("steer_rows", {"steer_rows": torch.zeros(8, 3).t()}),
        ("probe_rows", {"probe_rows": torch.zeros(3, 6)}),
        ("probe_rows", {"probe_rows": torch.zeros(2, 8)}),
        ("probe_rows", {"probe_out": None}),
        ("probe_out", {"probe_rows": None}),
        ("probe_out", {"probe_out": torch.zeros(5, 2, dtype=torch.bfloat16)}),
        ("probe_out", {"probe_out": torch.zeros(3, 2)}),
        ("probe_out", {"probe_out": torch.zeros(5, 3)}),
    ],
)
def test_reference_validation_names_the_argument(name, override):
    args = {**_valid_args(), **override}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        steer_probe_reference(**args)


def test_reference_accepts_valid_args():
    steer_probe_reference(**_valid_args())
    steer_probe_reference(**{**_valid_args(), "probe_rows": None, "probe_out": None})
