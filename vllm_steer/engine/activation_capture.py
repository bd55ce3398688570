"""Activation capture for the fit pipeline, on the worker.

A capture request carries ``extra_args["vllm_steer_capture"] = {"key": ..., "positions": [...],
"mean_from": ..., "mean_to": ...}``. While the engine computes its prompt, the capturer keeps, for
every layer, the per-head attention output (the input of ``o_proj``) and the residual stream (the
decoder layer's output) at the listed positions, and their sum over ``[mean_from, mean_to)``. The
front-end collects the results by key (``collect``) once the requests have finished.

Every requested position must actually be computed in the engine: capture engines run with prefix
caching off, and ``collect`` refuses results with positions that were never seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_steer.errors import SpecError

CAPTURE_KEY = "vllm_steer_capture"


class CaptureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    positions: tuple[int, ...] = ()
    mean_from: int | None = Field(default=None, ge=0)
    mean_to: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something_to_capture(self) -> CaptureSpec:
        if not self.positions and self.mean_from is None:
            raise ValueError("give positions, mean_from, or both")
        if any(p < 0 for p in self.positions):
            raise ValueError("positions must be >= 0")
        if self.mean_from is not None and self.mean_to is not None and self.mean_to <= self.mean_from:
            raise ValueError("mean_to must be > mean_from")
        return self


def parse_capture(extra_args: Mapping[str, Any] | None) -> CaptureSpec | None:
    raw = (extra_args or {}).get(CAPTURE_KEY)
    if raw is None:
        return None
    try:
        return CaptureSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join([CAPTURE_KEY, *(str(p) for p in err["loc"])])
        raise SpecError(f"invalid {field}: {err['msg']}", field=field) from None


@dataclass
class CaptureResult:
    """Per-request captured activations (float32, CPU). W = this rank's heads x head_dim."""

    spec: CaptureSpec
    num_prompt_tokens: int
    heads_at: torch.Tensor  # [P, L, W]
    residual_at: torch.Tensor  # [P, L, hidden]
    heads_sum: torch.Tensor  # [L, W]
    residual_sum: torch.Tensor  # [L, hidden]
    mean_count: int = 0
    seen: set[int] = field(default_factory=set)

    def missing_positions(self) -> list[int]:
        wanted = set(self.spec.positions)
        if self.spec.mean_from is not None:
            wanted |= set(range(self.spec.mean_from, self.mean_end))
        return sorted(wanted - self.seen)

    @property
    def mean_end(self) -> int:
        return self.spec.mean_to if self.spec.mean_to is not None else self.num_prompt_tokens


@dataclass
class _StepSelection:
    """Which rows of this step's flat token batch each capture request wants."""

    at_rows: torch.Tensor  # [A] flat token index
    at_targets: list[tuple[CaptureResult, int]]  # (result, index into its positions), per row
    mean_spans: list[tuple[CaptureResult, int, int]]  # (result, first row, end row)


class ActivationCapturer:
    def __init__(self, num_layers: int, local_width: int, hidden_size: int) -> None:
        self.num_layers = num_layers
        self.local_width = local_width
        self.hidden_size = hidden_size
        self._active: dict[str, CaptureResult] = {}  # req_id -> result of a running request
        self._by_key: dict[str, CaptureResult] = {}  # key -> result, until collected
        self._step: _StepSelection | None = None

    def _result_for(self, req_id: str, spec: CaptureSpec, num_prompt: int) -> CaptureResult:
        result = self._active.get(req_id)
        if result is None:
            bad = [p for p in spec.positions if p >= num_prompt]
            if bad or (spec.mean_to or 0) > num_prompt or (spec.mean_from or 0) >= num_prompt:
                raise SpecError(
                    f"{CAPTURE_KEY}: positions must lie inside the prompt of {num_prompt} tokens",
                    field=f"{CAPTURE_KEY}.positions",
                )
            p, l = len(spec.positions), self.num_layers
            result = CaptureResult(
                spec=spec,
                num_prompt_tokens=num_prompt,
                heads_at=torch.zeros(p, l, self.local_width),
                residual_at=torch.zeros(p, l, self.hidden_size),
                heads_sum=torch.zeros(l, self.local_width),
                residual_sum=torch.zeros(l, self.hidden_size),
            )
            if spec.key in self._by_key:
                raise SpecError(f"{CAPTURE_KEY}.key {spec.key!r} is already in use", field=f"{CAPTURE_KEY}.key")
            self._active[req_id] = result
            self._by_key[spec.key] = result
        return result

    def plan_step(self, requests: list[tuple[str, CaptureSpec, int, int, int, int]], device) -> None:
        """``requests``: (req_id, spec, num_prompt, first_row, num_computed, num_scheduled)."""
        at_rows: list[int] = []
        at_targets: list[tuple[CaptureResult, int]] = []
        mean_spans: list[tuple[CaptureResult, int, int]] = []
        for req_id, spec, num_prompt, first_row, start, count in requests:
            result = self._result_for(req_id, spec, num_prompt)
            end = start + count
            for i, pos in enumerate(spec.positions):
                if start <= pos < end:
                    at_rows.append(first_row + pos - start)
                    at_targets.append((result, i))
            if spec.mean_from is not None:
                # After a preemption the prompt is recomputed: add each position to the mean once.
                covered_to = max(result.seen) + 1 if result.seen else 0
                lo, hi = max(start, spec.mean_from, covered_to), min(end, result.mean_end)
                if lo < hi:
                    mean_spans.append((result, first_row + lo - start, first_row + hi - start))
                    result.mean_count += hi - lo
            result.seen.update(range(start, min(end, num_prompt)))
        self._step = (
            _StepSelection(torch.tensor(at_rows, dtype=torch.long, device=device), at_targets, mean_spans)
            if at_targets or mean_spans
            else None
        )

    def record(self, kind: str, layer: int, activations: torch.Tensor) -> None:
        """Called from the model hooks with this step's [T, W] (heads) or [T, hidden] (residual)."""
        step = self._step
        if step is None:
            return
        at_name, sum_name = ("heads_at", "heads_sum") if kind == "heads" else ("residual_at", "residual_sum")
        if step.at_targets:
            rows = activations.index_select(0, step.at_rows).float().cpu()
            for row, (result, i) in zip(rows, step.at_targets):
                getattr(result, at_name)[i, layer] = row
        for result, lo, hi in step.mean_spans:
            getattr(result, sum_name)[layer] += activations[lo:hi].float().sum(0).cpu()

    def finish(self, req_ids) -> None:
        for req_id in req_ids:
            self._active.pop(req_id, None)

    def collect(self, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Pop finished results as plain tensors: *_at [P, L, .] and *_mean [L, .]."""
        out = {}
        for key in keys:
            result = self._by_key.pop(key, None)
            if result is None:
                raise KeyError(f"no capture with key {key!r}")
            missing = result.missing_positions()
            if missing:
                raise RuntimeError(
                    f"capture {key!r}: positions {missing[:8]} were never computed "
                    "(was prefix caching on?)"
                )
            count = max(result.mean_count, 1)
            out[key] = {
                "heads_at": result.heads_at,
                "residual_at": result.residual_at,
                "heads_mean": result.heads_sum / count,
                "residual_mean": result.residual_sum / count,
            }
        return out
