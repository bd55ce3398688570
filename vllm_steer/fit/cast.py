"""CAST's condition: whether a prompt calls for a behaviour, read from one layer's hidden state.

Formulas (conditional activation steering, CAST):

* A prompt's state at layer L is the mean over its tokens of the residual stream entering layer L
  (the output of layer L − 1), ``h``.
* With the unit condition direction ``v`` and its projector ``P = v vᵀ``, the prompt's similarity
  is ``cos(h, tanh(P h))``.
* The condition holds when that similarity is above the threshold (``comparison="above"``) or below
  it (``"below"``). CAST's library names these by the threshold: its "larger" means the threshold is
  larger than the similarity, i.e. ``below`` here.
* The condition point (layer, threshold, comparison) is the one with the best F1 on labelled
  validation prompts (condition present = positive), searched over the candidate layers, thresholds
  0.00 … 0.99 in steps of 0.01 and both comparisons, in that order; the first best wins.

The direction is the mean over condition-present prompts minus the mean over condition-absent ones
(of ``h``), unit-normalised (``condition_direction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

from vllm_steer.errors import SteeringError

Comparison = Literal["above", "below"]
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(100))


@dataclass(frozen=True)
class ConditionPoint:
    layer: int
    threshold: float
    comparison: Comparison
    f1: float

    def holds(self, similarity: torch.Tensor) -> torch.Tensor:
        """Where the condition holds for these similarities (bool, same shape)."""
        return similarity > self.threshold if self.comparison == "above" else similarity < self.threshold


def condition_direction(present: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """Unit ``mean(present) − mean(absent)`` of per-prompt states ([N, d] each): [d] float32."""
    if present.ndim != 2 or absent.ndim != 2 or present.shape[1] != absent.shape[1]:
        raise SteeringError(f"condition states must be [N, d] with one d, got {list(present.shape)} and "
                            f"{list(absent.shape)}", field="prompts")
    if present.shape[0] == 0 or absent.shape[0] == 0:
        raise SteeringError("the condition needs prompts with it and prompts without it", field="prompts")
    diff = present.double().mean(0) - absent.double().mean(0)
    norm = diff.norm()
    if norm == 0:
        raise SteeringError("prompts with and without the condition have the same mean state", field="prompts")
    return (diff / norm).float()


def condition_similarity(states: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``cos(h, tanh(P h))`` for each row ``h`` of ``states`` [N, d]; ``direction`` [d] (normalised here)."""
    v = direction.float() / direction.float().norm()
    h = states.float()
    projected = torch.tanh((h @ v)[:, None] * v[None, :])
    return torch.nn.functional.cosine_similarity(h, projected, dim=-1)


def f1_score(labels: torch.Tensor, predicted: torch.Tensor) -> float:
    """Binary F1 of ``predicted`` against ``labels`` (bool); 0 when nothing is positive in either."""
    tp = int((labels & predicted).sum())
    fp = int((~labels & predicted).sum())
    fn = int((labels & ~predicted).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def best_condition_point(
    similarities: Mapping[int, torch.Tensor],
    labels: torch.Tensor | Sequence[int],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> ConditionPoint:
    """The (layer, threshold, comparison) with the best F1 (``similarities``: each candidate layer's
    similarities of the validation prompts, in the order of ``labels``)."""
    truth = torch.as_tensor(labels).bool()
    if not similarities:
        raise SteeringError("no candidate layer for the condition", field="layers")
    best: ConditionPoint | None = None
    for layer in sorted(similarities):
        sims = similarities[layer]
        if sims.shape != truth.shape:
            raise SteeringError(f"layer {layer}: {sims.shape[0]} similarities for {truth.shape[0]} labels",
                                field="labels")
        for threshold in thresholds:
            for comparison in ("above", "below"):
                point = ConditionPoint(layer, float(threshold), comparison, 0.0)
                f1 = f1_score(truth, point.holds(sims))
                if best is None or f1 > best.f1:
                    best = ConditionPoint(layer, float(threshold), comparison, f1)
    return best
