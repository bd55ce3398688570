"""Persistent device buffers for the FASB probe scorer: per-slot probe weights and per-token probe
outputs, at the layers where some pack has probed heads.

* ``probe_rows`` [L_p, S, H_local * D] float32 – slot s's probe weight for each local head of layer
  ``probe_layers[j]`` (zero for heads its pack does not probe). The steer+probe op reads it.
* ``probe_out``  [L_p, max_tokens, H_local] float32 – what the op writes every forward: for each token
  with a non-zero slot, the dot product of each local head's activation (before steering) with its
  slot's probe weight.

``scores`` turns those dots into each monitored request's mean P(desired) over its pack's K probes:
``mean_k sigmoid(w_k . a_k + b_k)``. Under tensor parallelism each rank holds a slice of the heads,
so it returns per-rank sums of sigmoids; the caller all-reduces them and divides by K. Under
pipeline parallelism a stage's table holds only its own layers (``probe_layers``), so its sums cover
its probes; the stages' sums are added before the division.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_steer.engine.steering_table import RankLayout
from vllm_steer.pack import SteerPack


@dataclass(frozen=True)
class _PackProbes:
    weight_row: torch.Tensor  # [L_p, H_local * D] this rank's probe weights, zero elsewhere
    layer_index: torch.Tensor  # [K_local] index into probe_layers
    local_head: torch.Tensor  # [K_local]
    bias: torch.Tensor  # [K_local]
    num_probes: int  # K over all ranks and stages


class ProbeTable:
    def __init__(
        self,
        layout: RankLayout,
        probe_layers: list[int],
        max_num_tokens: int,
        num_slots: int,
        device: torch.device | str,
    ) -> None:
        self.layout = layout
        self.probe_layers = list(probe_layers)
        self.device = torch.device(device)
        self._layer_index = {l: j for j, l in enumerate(self.probe_layers)}
        self.probe_rows = torch.zeros(
            len(self.probe_layers), num_slots, layout.local_width, dtype=torch.float32, device=self.device
        )
        self.probe_out = torch.zeros(
            len(self.probe_layers), max_num_tokens, layout.local_heads, dtype=torch.float32, device=self.device
        )
        self._packs: dict[str, _PackProbes] = {}

    @staticmethod
    def layers_of(packs) -> list[int]:
        """The layers that need probe buffers: those of every selected head of packs with probes."""
        return sorted({l for p in packs if p.probe_weights is not None for l in p.head_layers.tolist()})

    def buffer_bytes(self) -> int:
        """Device bytes of the per-slot probe rows and the per-token probe outputs."""
        return self.probe_rows.nbytes + self.probe_out.nbytes

    def has_layer(self, layer: int) -> bool:
        return layer in self._layer_index

    def rows_of(self, layer: int) -> torch.Tensor:
        return self.probe_rows[self._layer_index[layer]]

    def out_of(self, layer: int) -> torch.Tensor:
        return self.probe_out[self._layer_index[layer]]

    def write_slot(self, slot: int, pack: SteerPack) -> None:
        self.probe_rows[:, slot].copy_(self._probes(pack).weight_row)

    def forget_pack(self, name: str) -> None:
        """Drop the cached probes of pack ``name`` (removed while serving)."""
        self._packs.pop(name, None)

    def _probes(self, pack: SteerPack) -> _PackProbes:
        hit = self._packs.get(pack.name)
        if hit is not None:
            return hit
        if pack.probe_weights is None:
            raise ValueError(f"pack {pack.name!r} has no probes")
        layout = self.layout
        first_head = layout.tp_rank * layout.local_heads
        weight_row = torch.zeros(len(self.probe_layers), layout.local_width)
        layer_index, local_head, bias = [], [], []
        for k, (layer, head) in enumerate(pack.selected_heads):
            h = head - first_head
            j = self._layer_index.get(layer)
            if not 0 <= h < layout.local_heads or j is None:
                continue  # another rank (or pipeline stage) holds this head
            weight_row[j, h * layout.head_dim : (h + 1) * layout.head_dim] = pack.probe_weights[k]
            layer_index.append(j)
            local_head.append(h)
            bias.append(float(pack.probe_biases[k]))
        probes = _PackProbes(
            weight_row=weight_row.to(self.device),
            layer_index=torch.tensor(layer_index, dtype=torch.long, device=self.device),
            local_head=torch.tensor(local_head, dtype=torch.long, device=self.device),
            bias=torch.tensor(bias, dtype=torch.float32, device=self.device),
            num_probes=len(pack.selected_heads),
        )
        self._packs[pack.name] = probes
        return probes

    def sigmoid_sums(self, rows: torch.Tensor, by_pack: dict[str, tuple[SteerPack, list[int]]]) -> torch.Tensor:
        """For each token row: the sum over this rank's (and stage's) probed heads of its pack's
        sigmoid(logit).

        ``rows`` [M] long on the device; ``by_pack`` maps a pack name to (pack, indices into ``rows``).
        Returns [M] float32 on the device."""
        sums = torch.zeros(rows.shape[0], dtype=torch.float32, device=self.device)
        for pack, members in by_pack.values():
            probes = self._probes(pack)
            if probes.layer_index.numel() == 0:
                continue
            whole = len(members) == rows.shape[0]
            index = None if whole else torch.tensor(members, dtype=torch.long, device=self.device)
            r = rows if whole else rows[index]
            logits = self.probe_out[probes.layer_index[None, :], r[:, None], probes.local_head[None, :]]
            group_sums = torch.sigmoid(logits + probes.bias).sum(dim=-1)
            if whole:
                sums = group_sums
            else:
                sums[index] = group_sums
        return sums

    def probe_counts(self, by_pack: dict[str, tuple[SteerPack, list[int]]], num_rows: int) -> torch.Tensor | float:
        """K of each row's pack (over all ranks), to turn the summed sigmoids into means."""
        if len(by_pack) == 1:
            (pack, _), = by_pack.values()
            return float(self._probes(pack).num_probes)
        counts = torch.empty(num_rows, dtype=torch.float32)
        for pack, members in by_pack.values():
            counts[members] = float(self._probes(pack).num_probes)
        return counts.to(self.device)
