"""L2S on the worker: one pack's predictor, run inside the prefill forward pass.

Per step the planner fills ``rows`` (the token row of each predicting request's last prompt token in
the flattened batch) and ``slots`` (its steering slot; 0 = unused entry). During the forward, after
decoder layer ``read_layer`` (L'), ``torch.ops.vllm_steer.l2s_predict`` writes
``alpha * g(x)``, ``g(x) = W_out tanh(W_in x + b_in)``, into the request's row of the residual
table at ``steer_layer`` (L*), adding it to what the row holds (the other members of a composition
at L*); the residual steering op at L* then adds the row. When
L' <= L* that happens in the same pass, so the last prompt token is already steered. With L' = L*
both run on the output of the same decoder layer: the predictor's hook is registered before the
steering hook (``model_hooks.install_l2s_hooks``), so it reads the unsteered stream after L*, and
the add that follows in the same hook chain already uses the new row (the reference's two-pass
form: pass 1 unsteered gives h_{L'}, pass 2 adds at L*). Under chunked prefill the read happens in
the chunk that holds the last prompt token, the first steered prompt position, so no earlier chunk
would have needed the vector.
"""

from __future__ import annotations

import torch

from vllm_steer.engine.host_staging import staging_buffer
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.pack import SteerPack


class L2SPredictor:
    def __init__(self, pack: SteerPack, table: SteeringTable, max_num_reqs: int, device: torch.device | str) -> None:
        info = pack.manifest.l2s
        self.pack_name = pack.name
        self.read_layer = info.read_layer
        self.steer_layer = info.steer_layer
        device = torch.device(device)
        self.w_in = pack.l2s_w_in.to(device)
        self.b_in = pack.l2s_b_in.to(device)
        self.w_out = pack.l2s_w_out.to(device)
        self.out_rows = table.residual_rows_of(self.steer_layer)
        self.rows = torch.zeros(max_num_reqs, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_num_reqs, dtype=torch.long, device=device)
        self.scales = torch.zeros(max_num_reqs, dtype=torch.float32, device=device)
        self._host_rows = staging_buffer(max_num_reqs, torch.long, device)
        self._host_slots = staging_buffer(max_num_reqs, torch.long, device)
        self._host_scales = staging_buffer(max_num_reqs, torch.float32, device)
        self._active = 0

    @property
    def same_pass(self) -> bool:
        """Whether the vector exists before layer L* of the pass that computes it."""
        return self.read_layer <= self.steer_layer

    def set_step(self, entries: list[tuple[int, int, float]]) -> None:
        """This step's (token row, slot, alpha) entries; an empty list deactivates every entry."""
        if not entries and not self._active:
            return
        self._host_rows.zero_()
        self._host_slots.zero_()
        self._host_scales.zero_()
        for i, (row, slot, alpha) in enumerate(entries):
            self._host_rows[i] = row
            self._host_slots[i] = slot
            self._host_scales[i] = alpha
        self.rows.copy_(self._host_rows, non_blocking=True)
        self.slots.copy_(self._host_slots, non_blocking=True)
        self.scales.copy_(self._host_scales, non_blocking=True)
        self._active = len(entries)

    def run(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        torch.ops.vllm_steer.l2s_predict(
            hidden, residual, self.rows, self.slots, self.scales, self.w_in, self.b_in, self.w_out, self.out_rows
        )
