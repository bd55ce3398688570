"""Steering directions and scales from captured activations.

* :func:`mass_mean_directions` — ITI's default per-head direction: mean(label 1) − mean(label 0),
  unit-normalised per (layer, head).
* :func:`probe_directions` — ITI's alternative: the probe weight, unit-normalised.
* :func:`projection_sigma` — ITI's σ per head: the **population** standard deviation (numpy's
  ``np.std``, ddof=0, as ITI's reference code) of ⟨a, θ̂⟩ over the tuning activations.
* :func:`residual_mean_difference` — the CAA vector per layer: mean(desired) − mean(undesired) of
  the residual stream, **not** normalised.

Means are accumulated in float64 (projections are float32 dot products, their std in float64);
results are float32. Inputs are read a chunk of rows at a time, so no float64 copy of them is made.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.probes import HeadProbes

_ROWS_PER_CHUNK = 256


def mass_mean_directions(
    features: torch.Tensor, labels: torch.Tensor | Sequence[int], idx: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """Unit ``mean(features[label 1]) − mean(features[label 0])`` over ``idx`` (all rows if None): [L, H, D]."""
    _require_dims(features, 4, "features", "[N, L, H, D]")
    difference = _class_mean_difference(features, labels, idx)
    return _unit(difference, "mass-mean direction (the two class means coincide)")


def probe_directions(probes: HeadProbes) -> torch.Tensor:
    """The probes' weights, unit-normalised per head: [L, H, D]."""
    return _unit(probes.weight.to(torch.float64), "probe weight (the probe learned nothing)")


def projection_sigma(tuning_features: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Population std over the M tuning rows of ⟨a, θ̂⟩ per head: [M, L, H, D] x [L, H, D] -> [L, H]."""
    _require_dims(tuning_features, 4, "tuning_features", "[M, L, H, D]")
    _require_dims(directions, 3, "directions", "[L, H, D]")
    if tuning_features.shape[1:] != directions.shape:
        raise ValueError(
            f"tuning_features {tuple(tuning_features.shape)} and directions {tuple(directions.shape)} disagree on [L, H, D]"
        )
    if tuning_features.shape[0] == 0:
        raise SteeringError("no tuning activations to measure sigma on", field="tuning_features")
    theta = directions.to(torch.float32)
    projections = torch.cat([
        torch.einsum("mlhd,lhd->mlh", tuning_features[start : start + _ROWS_PER_CHUNK].to(torch.float32), theta)
        for start in range(0, tuning_features.shape[0], _ROWS_PER_CHUNK)
    ]).to(torch.float64)
    return projections.std(dim=0, unbiased=False).to(torch.float32)


def residual_mean_difference(
    residual_features: torch.Tensor, labels: torch.Tensor | Sequence[int], idx: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """``mean(desired) − mean(undesired)`` of the residual stream over ``idx`` (all if None): [L, hidden]."""
    _require_dims(residual_features, 3, "residual_features", "[N, L, hidden]")
    return _class_mean_difference(residual_features, labels, idx).to(torch.float32)


def _class_mean_difference(features: torch.Tensor, labels, idx) -> torch.Tensor:
    n = features.shape[0]
    y = torch.as_tensor(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries but features has {n} rows")
    if not bool(((y == 0) | (y == 1)).all()):
        raise SteeringError("labels must be 0 or 1", field="labels")
    rows = torch.arange(n) if idx is None else torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"idx has indices outside [0, {n})")
    y = y[rows]
    positive, negative = rows[y == 1], rows[y == 0]
    if len(positive) == 0 or len(negative) == 0:
        missing = 1 if len(positive) == 0 else 0
        raise SteeringError(f"no examples with label {missing} among the selected rows", field="labels")
    return _mean(features, positive) - _mean(features, negative)


def _mean(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Float64 mean of ``features[rows]``, a chunk of rows at a time (no full float64 copy)."""
    total = torch.zeros(features.shape[1:], dtype=torch.float64)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        chunk = features.index_select(0, rows[start : start + _ROWS_PER_CHUNK])
        total += chunk.sum(dim=0, dtype=torch.float64)
    return total / len(rows)


def _unit(vectors: torch.Tensor, what: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    zero = norms[..., 0] <= 1e-12 * max(1.0, float(vectors.abs().max()))
    if bool(zero.any()):
        where = [tuple(i) for i in zero.nonzero().tolist()]
        raise SteeringError(
            f"zero-length {what} at (layer, head) {where[:5]}{' ...' if len(where) > 5 else ''}; "
            f"cannot normalise it",
            field="directions",
        )
    return (vectors / norms).to(torch.float32)


def _require_dims(t: torch.Tensor, dims: int, name: str, shape: str) -> None:
    if t.dim() != dims or not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor {shape}, got {t.dtype} {tuple(t.shape)}")
