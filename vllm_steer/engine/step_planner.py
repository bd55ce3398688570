"""Per-step bookkeeping on the worker: which request is steered how, and which slot each token uses.

The integration layer calls ``plan_step`` once per forward pass with the batch in the runner's
order; this writes ``table.token_slots`` in place. Work per step is O(batch) in numpy plus one
host-to-device copy, whatever the number of distinct configs in the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.errors import SteeringError
from vllm_steer.pack import SteerPack
from vllm_steer.pack_registry import PackRegistry
from vllm_steer.spec import SteeringSpec, parse_spec

logger = logging.getLogger(__name__)
NO_STEERING = np.iinfo(np.int64).max  # a steer_start no position reaches


@dataclass(frozen=True)
class RequestSteering:
    spec: SteeringSpec
    pack: SteerPack


class StepPlanner:
    def __init__(self, table: SteeringTable, registry: PackRegistry) -> None:
        self.table = table
        self.registry = registry
        self._requests: dict[str, RequestSteering | None] = {}
        self._slot_owner: list[tuple[str, RequestSteering] | None] = [None] * table.num_slots
        self._dirty_tokens = 0  # how many leading entries of token_slots may be non-zero
        self._host_slots = torch.zeros(table.token_slots.shape[0], dtype=torch.int32)

    # -- request lifecycle -------------------------------------------------------------------
    def steering_of(
        self, req_id: str, extra_args_of: Callable[[str], Mapping[str, Any] | None]
    ) -> RequestSteering | None:
        if req_id in self._requests:
            return self._requests[req_id]
        steering = None
        try:
            spec = parse_spec(extra_args_of(req_id))
            if spec is not None and spec.active:
                pack = self.registry.resolve(spec)
                if pack is not None:
                    steering = RequestSteering(spec, pack)
        except SteeringError as exc:  # the front-end validates first; this only guards the worker
            logger.error("request %s: steering spec refused in the worker, running unsteered: %s", req_id, exc)
        self._requests[req_id] = steering
        return steering

    def forget(self, req_ids: Sequence[str]) -> None:
        for req_id in req_ids:
            self._requests.pop(req_id, None)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)

    # -- per step ------------------------------------------------------------------------------
    def plan_step(
        self,
        req_ids: Sequence[str],
        num_scheduled: np.ndarray,
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
        extra_args_of: Callable[[str], Mapping[str, Any] | None],
    ) -> int:
        """Write this step's per-token slots; returns the number of steered tokens."""
        num_reqs = len(req_ids)
        total = int(num_scheduled[:num_reqs].sum())
        slot_of_req = np.zeros(num_reqs, dtype=np.int32)
        start_of_req = np.full(num_reqs, NO_STEERING, dtype=np.int64)
        any_steered = False
        for i, req_id in enumerate(req_ids):
            steering = self.steering_of(req_id, extra_args_of)
            if steering is None:
                continue
            slot = i + 1
            owner = self._slot_owner[slot]
            if owner is None or owner[0] != req_id or owner[1] is not steering:
                self.table.write_slot(slot, steering.spec, steering.pack)
                self._slot_owner[slot] = (req_id, steering)
            slot_of_req[i] = slot
            start_of_req[i] = steering.spec.steer_start(int(num_prompt[i]))
            any_steered = True

        if not any_steered:
            if self._dirty_tokens:
                self.table.token_slots[: self._dirty_tokens].zero_()
                self._dirty_tokens = 0
            return 0

        counts = num_scheduled[:num_reqs].astype(np.int64)
        req_of_token = np.repeat(np.arange(num_reqs), counts)
        first_token = np.cumsum(counts) - counts
        positions = num_computed[:num_reqs].astype(np.int64)[req_of_token] + (
            np.arange(total) - first_token[req_of_token]
        )
        token_slots = np.where(positions >= start_of_req[req_of_token], slot_of_req[req_of_token], 0)
        host = self._host_slots[: max(total, self._dirty_tokens)]
        host.zero_()
        host[:total] = torch.from_numpy(token_slots.astype(np.int32))
        self.table.token_slots[: host.shape[0]].copy_(host)
        self._dirty_tokens = total
        return int(np.count_nonzero(token_slots))
