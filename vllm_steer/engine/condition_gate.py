"""CAST on the worker: one condition pack's gate, decided inside the prefill forward pass.

A conditioned request gets a row of ``sums`` (its running sum of the stream entering the condition
layer) for as long as its prompt is being read; rows are stable across steps, unlike slots, so a
prompt prefilled in several chunks adds up in one place. Per step the planner fills ``token_rows``
(each token's sum row, 0 = not read) and the finish entries (the requests whose last prompt token is
in the step: their sum row, slot, prompt length, threshold and comparison). During the forward,
after decoder layer ``layer - 1``, ``torch.ops.vllm_steer.condition_gate`` adds the step's tokens to
the sums, decides each finishing request's gate and multiplies its steering rows by it: the layers
after the condition layer in the same pass, and every later step, steer the request only when its
prompt meets the condition. The gate stays on the device (no host sync); ``gate_of`` gives it to the
planner, which keeps a copy per request so a request that changes slot takes it along.
"""

from __future__ import annotations

import torch

import vllm_steer.ops  # noqa: F401  (registers torch.ops.vllm_steer.condition_gate)
from vllm_steer.engine.host_staging import staging_buffer
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.errors import SteeringError
from vllm_steer.pack import SteerPack


class ConditionGate:
    def __init__(self, pack: SteerPack, table: SteeringTable, max_num_reqs: int, max_num_tokens: int,
                 device: torch.device | str) -> None:
        info = pack.manifest.condition
        self.pack_name = pack.name
        self.layer = info.layer
        self.threshold = info.threshold
        self.comparison = info.comparison
        device = torch.device(device)
        self.direction = pack.condition_direction.to(device)
        self.head_rows = table.head_rows
        self.residual_rows = table.residual_rows
        # requests reading their prompt at once: those in the batch, and preempted ones that keep a row
        num_rows = 2 * max_num_reqs + 1
        self.sums = torch.zeros(num_rows, table.layout.hidden_size, dtype=torch.float32, device=device)
        self.gates = torch.zeros(num_rows, dtype=torch.float32, device=device)
        self.token_rows = torch.zeros(max_num_tokens, dtype=torch.long, device=device)
        self.finish_rows = torch.zeros(max_num_reqs, dtype=torch.long, device=device)
        self.finish_slots = torch.zeros(max_num_reqs, dtype=torch.long, device=device)
        self.finish_counts = torch.zeros(max_num_reqs, dtype=torch.float32, device=device)
        self.finish_thresholds = torch.zeros(max_num_reqs, dtype=torch.float32, device=device)
        self.finish_above = torch.zeros(max_num_reqs, dtype=torch.bool, device=device)
        self._host_token_rows = staging_buffer(max_num_tokens, torch.long, device)
        self._host_finish = {
            name: staging_buffer(max_num_reqs, getattr(self, name).dtype, device)
            for name in ("finish_rows", "finish_slots", "finish_counts", "finish_thresholds", "finish_above")
        }
        self._free_rows = list(range(num_rows - 1, 0, -1))
        self._row_of: dict[str, int] = {}
        self._dirty_tokens = 0
        self._active_finishes = 0

    def row_of(self, req_id: str) -> int:
        """The request's sum row (a new one, zeroed, for a request starting its prompt)."""
        row = self._row_of.get(req_id)
        if row is None:
            if not self._free_rows:
                raise SteeringError(f"condition pack {self.pack_name!r}: more than {self.sums.shape[0] - 1} "
                                    "requests are reading their prompt at once", field="steering.condition")
            row = self._row_of[req_id] = self._free_rows.pop()
            self.sums[row].zero_()
        return row

    def restart(self, req_id: str) -> None:
        """The request's prompt is read again from its first token (it was preempted mid-prefill)."""
        self.sums[self.row_of(req_id)].zero_()

    def release(self, req_id: str) -> None:
        row = self._row_of.pop(req_id, None)
        if row is not None:
            self._free_rows.append(row)

    def gate_of(self, req_id: str) -> torch.Tensor:
        """[1] on the device: the request's gate, decided in its last forward (a copy)."""
        return self.gates[self._row_of[req_id]].reshape(1).clone()

    def set_step(self, token_spans: list[tuple[int, int, int]],
                 finishes: list[tuple[int, int, int, float, bool]]) -> None:
        """This step's reads: ``token_spans`` (first token row, token count, sum row) and ``finishes``
        (sum row, slot, prompt length, threshold, above); empty lists deactivate everything."""
        if token_spans or self._dirty_tokens:
            end = max((first + count for first, count, _ in token_spans), default=0)
            host = self._host_token_rows[: max(end, self._dirty_tokens)]
            host.zero_()
            for first, count, row in token_spans:
                host[first:first + count] = row
            self.token_rows[: host.shape[0]].copy_(host, non_blocking=True)
            self._dirty_tokens = end
        if finishes or self._active_finishes:
            for buffer in self._host_finish.values():
                buffer.zero_()
            for i, (row, slot, count, threshold, above) in enumerate(finishes):
                self._host_finish["finish_rows"][i] = row
                self._host_finish["finish_slots"][i] = slot
                self._host_finish["finish_counts"][i] = count
                self._host_finish["finish_thresholds"][i] = threshold
                self._host_finish["finish_above"][i] = above
            for name, buffer in self._host_finish.items():
                getattr(self, name).copy_(buffer, non_blocking=True)
            self._active_finishes = len(finishes)

    def run(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        torch.ops.vllm_steer.condition_gate(
            hidden, residual, self.token_rows, self.sums, self.finish_rows, self.finish_slots, self.finish_counts,
            self.finish_thresholds, self.finish_above, self.direction, self.gates, self.head_rows, self.residual_rows,
        )
