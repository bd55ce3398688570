"""Persistent device buffers that hold every running request's steering rows.

Layout (S = 1 + max running requests x slots per request; slot 0 is the no-op row and is never
written):

* ``token_slots``   [max_tokens] int32 – the slot of each token of the current step (0 = unsteered,
  padding included). Rewritten in place every step.
* ``token_scales``  [max_tokens] float32 – what each token's head-steering row is multiplied by (1
  except for FASB, whose strength is per token). Rewritten with ``token_slots``.
* ``head_rows``     [L_h, S, H_local * D] float32 – what each slot adds to the o_proj input of each
  layer in ``head_layers`` (this rank's heads only, under tensor parallelism).
* ``residual_rows`` [L_r, S, hidden] float32 – what each slot adds to the residual stream after each
  layer in ``residual_layers``.

A slot is the request's row index in the runner's persistent batch plus one, so the table can never
run out: it has one slot per batch row, and a row that changes owner is rewritten before use. With
two slots per request (engines that can run FASB, so a composition with a FASB member can be
asked for) a request's second slot is ``second_slot(slot)``: it holds the composition's rows after
the FASB member's backtrack, while the first keeps the rows of the positions before it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from vllm_steer.pack import SteerPack
from vllm_steer.spec import SteeringSpec

BASE_CACHE_SIZE = 256
# The unit-alpha rows cached per (pack, method, subset) live on the device beside the table; on wide
# models with every layer hooked (live packs on a 70B shape: ~3 MB an entry) the entry count alone
# would let them grow past a GiB, so they are also bounded in bytes (the newest entry always stays).
BASE_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RankLayout:
    """Where this rank's attention heads sit in the model (our own type, filled by the integration)."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def local_width(self) -> int:
        return self.local_heads * self.head_dim

    @property
    def local_columns(self) -> slice:
        start = self.tp_rank * self.local_width
        return slice(start, start + self.local_width)


class SteeringTable:
    def __init__(
        self,
        layout: RankLayout,
        head_layers: list[int],
        residual_layers: list[int],
        max_num_tokens: int,
        max_num_reqs: int,
        device: torch.device | str,
        slots_per_request: int = 1,
    ) -> None:
        if slots_per_request not in (1, 2):
            raise ValueError(f"slots_per_request must be 1 or 2, got {slots_per_request}")
        self.layout = layout
        self.head_layers = list(head_layers)
        self.residual_layers = list(residual_layers)
        self.max_num_reqs = max_num_reqs
        self.slots_per_request = slots_per_request
        self.num_slots = max_num_reqs * slots_per_request + 1
        self.device = torch.device(device)
        self._head_index = {l: j for j, l in enumerate(self.head_layers)}
        self._residual_index = {l: j for j, l in enumerate(self.residual_layers)}
        self.token_slots = torch.zeros(max_num_tokens, dtype=torch.int32, device=self.device)
        self.token_scales = torch.ones(max_num_tokens, dtype=torch.float32, device=self.device)
        self.head_rows = torch.zeros(
            len(self.head_layers), self.num_slots, layout.local_width, dtype=torch.float32, device=self.device
        )
        self.residual_rows = torch.zeros(
            len(self.residual_layers), self.num_slots, layout.hidden_size, dtype=torch.float32, device=self.device
        )
        self._bases: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def head_rows_of(self, layer: int) -> torch.Tensor:
        return self.head_rows[self._head_index[layer]]

    def residual_rows_of(self, layer: int) -> torch.Tensor:
        return self.residual_rows[self._residual_index[layer]]

    def second_slot(self, slot: int) -> int:
        """The request's second slot (tables with two slots per request)."""
        if self.slots_per_request != 2:
            raise IndexError("this steering table has one slot per request")
        self._check_slot(slot)
        return slot + self.max_num_reqs

    def write_slot(self, slot: int, spec: SteeringSpec, pack: SteerPack, alpha: float | None = None) -> None:
        """Fill ``slot`` with ``alpha`` (default: the spec's) times the spec's unit-alpha rows."""
        self.write_sum(slot, [(spec, pack, float(spec.alpha if alpha is None else alpha))])

    def write_sum(self, slot: int, parts: list[tuple[SteeringSpec, SteerPack, float]]) -> None:
        """Fill ``slot`` with the sum of ``alpha`` times each (spec, pack)'s unit-alpha rows (zero
        rows when ``parts`` is empty or every alpha is 0)."""
        self._check_slot(slot)
        if self.head_layers:
            self.head_rows[:, slot].zero_()
        if self.residual_layers:
            self.residual_rows[:, slot].zero_()
        for spec, pack, alpha in parts:
            self.add_to_slot(slot, spec, pack, alpha)

    def add_to_slot(self, slot: int, spec: SteeringSpec, pack: SteerPack, alpha: float) -> None:
        """Add ``alpha`` times the spec's unit-alpha rows to ``slot``."""
        self._check_slot(slot)
        if alpha == 0.0:
            return
        head_base, residual_base = self._base_rows(spec, pack)
        if self.head_layers:
            self.head_rows[:, slot].add_(head_base, alpha=alpha)
        if self.residual_layers:
            self.residual_rows[:, slot].add_(residual_base, alpha=alpha)

    def copy_slot(self, dst: int, src: int) -> None:
        self._check_slot(dst)
        self._check_slot(src)
        if self.head_layers:
            self.head_rows[:, dst].copy_(self.head_rows[:, src])
        if self.residual_layers:
            self.residual_rows[:, dst].copy_(self.residual_rows[:, src])

    def scale_slot(self, slot: int, factor: torch.Tensor) -> None:
        """Multiply ``slot``'s rows by ``factor`` ([1] on the device: a CAST gate, no host sync)."""
        self._check_slot(slot)
        if self.head_layers:
            self.head_rows[:, slot].mul_(factor)
        if self.residual_layers:
            self.residual_rows[:, slot].mul_(factor)

    def forget_pack(self, name: str) -> None:
        """Drop the cached rows of pack ``name`` (removed while serving: a new pack may take its name)."""
        for key in [k for k in self._bases if k[0] == name]:
            del self._bases[key]

    def _check_slot(self, slot: int) -> None:
        if not 0 < slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.num_slots - 1}")

    def _base_rows(self, spec: SteeringSpec, pack: SteerPack) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at alpha = 1 for this (pack, method, subset); cached, since alphas vary far more."""
        method = "iti" if spec.method == "fasb" else spec.method  # FASB steers with the ITI heads
        key = (pack.name, method, spec.layers, spec.heads)
        hit = self._bases.get(key)
        if hit is not None:
            self._bases.move_to_end(key)
            return hit
        layout = self.layout
        head = torch.zeros(len(self.head_layers), layout.num_heads * layout.head_dim)
        residual = torch.zeros(len(self.residual_layers), layout.hidden_size)
        wanted_layers = set(spec.layers) if spec.layers is not None else None
        if method == "iti":
            wanted_heads = set(spec.heads) if spec.heads is not None else None
            for i, (layer, h) in enumerate(pack.selected_heads):
                if wanted_layers is not None and layer not in wanted_layers:
                    continue
                if wanted_heads is not None and (layer, h) not in wanted_heads:
                    continue
                cols = slice(h * layout.head_dim, (h + 1) * layout.head_dim)
                head[self._head_index[layer], cols] = pack.head_sigmas[i] * pack.head_directions[i]
        elif method == "residual":
            for i, layer in enumerate(pack.residual_layers.tolist()):
                if wanted_layers is None or layer in wanted_layers:
                    residual[self._residual_index[layer]] = pack.residual_vectors[i]
        elif method == "mean_s":
            residual[self._residual_index[pack.manifest.l2s.steer_layer]] = pack.l2s_mean
        # l2s: zero rows; the predictor writes the request's own row during its prefill
        rows = (
            head[:, layout.local_columns].contiguous().to(self.device),
            residual.to(self.device),
        )
        self._bases[key] = rows
        while len(self._bases) > 1 and (len(self._bases) > BASE_CACHE_SIZE
                                        or self.cached_base_bytes() > BASE_CACHE_BYTES):
            self._bases.popitem(last=False)
        return rows

    def cached_base_bytes(self) -> int:
        return sum(h.nbytes + r.nbytes for h, r in self._bases.values())

    def buffer_bytes(self) -> int:
        """Device bytes of the persistent buffers (token arrays and per-slot rows; the cached unit
        rows, at most BASE_CACHE_BYTES more, are ``cached_base_bytes``)."""
        return sum(t.nbytes for t in (self.token_slots, self.token_scales, self.head_rows, self.residual_rows))
