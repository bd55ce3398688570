"""Per-step bookkeeping on the worker: which request is steered how, and which slot each token uses.

The integration layer calls ``plan_step`` once per forward pass with the batch in the runner's
order; this writes ``table.token_slots`` in place. Work per step is O(batch) in numpy plus one
host-to-device copy, whatever the number of distinct configs in the batch.

FASB requests (``spec.monitored``) get a slot whose steering rows stay zero until a backtrack: the
newest token of each step that samples for them carries the slot so the fused op probes it. A
backtrack arrives as a ``FasbUpdate`` (strength, first steered position) from the scheduler; from
then on the slot holds the unit-alpha ITI rows and each steered token's strength goes into
``table.token_scales`` (one value for ``strength="code"``, a per-position history for ``"paper"``).

A composition (``spec.ComposedSpec``) sums its members into the slot: the static members' rows at
their alphas, and the L2S member's predicted row added by the predictor. A FASB member among them
is probed on that slot; after its backtrack the positions from its first steered one use the
request's second slot (``SteeringTable.second_slot``): the first slot's rows plus the FASB heads at
the backtrack's strength, every token scale 1.

A condition (CAST, ``spec.gate``) holds the request's slot to its prompt: while the prompt is read,
the planner sends its tokens to the condition pack's ``ConditionGate``, which decides in the forward
with the last prompt token and multiplies the slot's rows by the gate (0 or 1). The planner keeps
each decided gate (on the device) and applies it whenever it rewrites the slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from vllm_steer.engine.condition_gate import ConditionGate
from vllm_steer.engine.fasb import FasbUpdate
from vllm_steer.engine.host_staging import staging_buffer
from vllm_steer.engine.l2s_predictor import L2SPredictor
from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.errors import SteeringError
from vllm_steer.pack import SteerPack
from vllm_steer.pack_registry import PackRegistry
from vllm_steer.spec import ConditionRequest, Steering, SteeringSpec, parse_spec

logger = logging.getLogger("vllm." + __name__)  # under vLLM's logger, so its handlers show it
NO_STEERING = np.iinfo(np.int64).max  # a steer_start no position reaches


Member = tuple[SteeringSpec, SteerPack]
STATIC_METHODS = ("iti", "residual", "mean_s")  # fixed rows, summed into the slot at the member's alpha


@dataclass(frozen=True)
class RequestSteering:
    """How one request is steered now. A new object (not a mutation) whenever that changes, so the
    planner rewrites the request's slots.

    ``added``: the members whose unit-alpha rows go into the request's slot at their own alpha
    (ITI, residual, Mean-S). ``l2s``: the member whose predictor adds ``alpha * g(x)`` to the slot in
    its prefill step. ``fasb``: the member the probes monitor. Its ITI heads steer from
    ``steer_from`` once a backtrack set it: on its own, as the slot's rows at the token scale
    ``strength`` (or the per-position ``strengths``); next to other members (``composed``), through
    the request's second slot, which holds the first slot's rows plus the FASB heads at ``strength``.
    """

    spec: Steering
    added: tuple[Member, ...] = ()
    l2s: Member | None = None
    fasb: Member | None = None
    steer_from: int | None = None  # FASB: first position its backtrack steers (None: none yet)
    monitor: bool = False  # probe the newest token of every sampling step (FASB)
    strength: float = 1.0  # FASB alone: the token scale of every position it steers
    # FASB alone: the scale of position steer_from + i (the last entry goes on for later positions),
    # after a second backtrack, or with strength="paper" (filled as scores arrive)
    strengths: list[float] | None = None
    adaptive: bool = False  # strength="paper": each score sets the next position's scale
    # CAST: the condition and its pack (the registry checked that every layer steered at the last
    # prompt token comes after the condition's read, so that token is gated in its own forward)
    gate: tuple[ConditionRequest, SteerPack] | None = None

    @classmethod
    def initial(cls, spec: Steering, packs: Sequence[SteerPack | None],
                gate_pack: SteerPack | None = None) -> RequestSteering | None:
        """The steering of a new request (``packs``: each member's, from ``PackRegistry.resolve_all``;
        ``gate_pack``: the pack of ``spec.gate``); None when no member steers anything."""
        members = [(m, p) for m, p in zip(spec.members, packs) if m.active and p is not None]
        if not members:
            return None
        return cls(
            spec,
            added=tuple(mp for mp in members if mp[0].method in STATIC_METHODS),
            l2s=next((mp for mp in members if mp[0].method == "l2s"), None),
            fasb=next((mp for mp in members if mp[0].monitored), None),
            monitor=any(m.monitored for m, _ in members),
            gate=(spec.gate, gate_pack) if spec.gate is not None else None,
        )

    @property
    def composed(self) -> bool:
        """A FASB member next to others: its backtrack's positions use the second slot."""
        return self.fasb is not None and (bool(self.added) or self.l2s is not None)

    @property
    def fasb_alone_steers(self) -> bool:
        return self.fasb is not None and not self.composed and self.steer_from is not None

    def scale_at(self, position: int) -> float:
        if self.strengths is None:
            return self.strength
        i = position - self.steer_from
        return self.strengths[i] if i < len(self.strengths) else self.strengths[-1]

    @property
    def scaled(self) -> bool:
        """Whether its tokens carry a token scale other than 1 (FASB alone, after a backtrack)."""
        return self.fasb_alone_steers and (self.strengths is not None or self.strength != 1.0)

    def first_steered(self, num_prompt_tokens: int) -> int:
        """The first position whose tokens use the request's (first) slot for steering."""
        if self.added or self.l2s is not None:
            start = self.spec.steer_start(num_prompt_tokens)
            return NO_STEERING if start is None else start
        return self.steer_from if self.fasb_alone_steers else NO_STEERING

    def second_steered(self) -> int:
        """The first position that uses the second slot (a composition's FASB backtrack)."""
        return self.steer_from if self.composed and self.steer_from is not None else NO_STEERING


@dataclass(frozen=True)
class MonitoredTokens:
    """This step's probed tokens: the newest token of each monitored request that samples."""

    req_ids: list[str]
    batch_index: np.ndarray  # [M] int64, each request's index in the step's batch
    rows: np.ndarray  # [M] int64, each token's row in the step's flattened batch
    positions: np.ndarray  # [M] int64, each token's absolute position
    by_pack: dict[str, tuple[SteerPack, list[int]]]  # pack name -> (pack, indices into req_ids)

    def __len__(self) -> int:
        return len(self.req_ids)

    def __bool__(self) -> bool:
        return bool(self.req_ids)


NOTHING_MONITORED = MonitoredTokens([], *(np.zeros(0, dtype=np.int64),) * 3, {})


class StepPlanner:
    def __init__(
        self,
        table: SteeringTable,
        registry: PackRegistry,
        probes: ProbeTable | None = None,
        predictors: dict[str, L2SPredictor] | None = None,
        gates: dict[str, ConditionGate] | None = None,
    ) -> None:
        self.table = table
        self.registry = registry
        self.probes = probes
        self.predictors = predictors or {}
        self.gates = gates or {}
        self._gate_values: dict[str, torch.Tensor] = {}  # req_id -> its decided gate ([1] on the device)
        self._gate_read_to: dict[str, int] = {}  # req_id -> prompt positions its condition has read
        self._gate_pending: list[tuple[str, ConditionGate]] = []  # decided in the last step
        self.conditions_decided = 0  # CAST gates decided, over the engine's life
        # how many of them held: summed on the device, read only when asked (conditions_met)
        self._conditions_met = torch.zeros((), dtype=torch.float32, device=table.token_slots.device)
        self._l2s_vectors: dict[str, torch.Tensor] = {}  # req_id -> its predicted row (unit alpha)
        self._l2s_pending: list[tuple[str, int, L2SPredictor]] = []  # predicted in the last step
        self.l2s_predictions = 0  # predictor runs, over the engine's life
        self.l2s_repeats = 0  # runs for a request that already had its vector (must stay 0)
        self._requests: dict[str, RequestSteering | None] = {}
        self._failed: dict[str, str] = {}  # req_id -> reason, not yet reported to the scheduler
        self._num_adaptive = 0  # tracked requests with strength="paper" after their trigger
        self._slot_owner: list[tuple[str, RequestSteering] | None] = [None] * table.num_slots
        self._dirty_tokens = 0  # how many leading entries of token_slots may be non-zero
        device = table.token_slots.device
        self._host_slots = staging_buffer(table.token_slots.shape[0], torch.int32, device)
        self._host_scales = staging_buffer(table.token_scales.shape[0], torch.float32, device, fill=1.0)
        # this step's monitored tokens' rows, on the device for the probe scorer (monitored_rows)
        self._host_monitored_rows = staging_buffer(table.token_slots.shape[0], torch.int64, device)
        self._monitored_rows = torch.zeros(table.token_slots.shape[0], dtype=torch.int64, device=device)
        self._scaled_tokens = 0  # how many leading entries of token_scales may differ from 1
        self.monitored = NOTHING_MONITORED  # this step's probed tokens
        self.hooked_layers: dict = {}  # PackRegistry.graph_key(), set by the worker once the ops are in
        self.pipeline_stage = (0, 1)  # (this worker's pipeline stage, number of stages), set by the worker
        # this step's partial probe sums from the previous pipeline stage ([M] on the device), or None
        self.received_probe_sums: torch.Tensor | None = None

    @property
    def monitored_rows(self) -> torch.Tensor:
        """[M] int64 on the device: the rows of this step's monitored tokens (``monitored.rows``)."""
        return self._monitored_rows[: len(self.monitored)]

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
                gate_pack = None
                if spec.gate is not None:
                    gate_pack = self.registry.condition_pack(spec.gate)
                    if gate_pack.name not in self.gates:
                        raise SteeringError(f"condition pack {gate_pack.name!r} has no gate on this worker",
                                            field="steering.condition.pack")
                steering = RequestSteering.initial(spec, self.registry.resolve_all(spec), gate_pack)
                if steering is not None and steering.monitor and self.probes is None:
                    raise SteeringError("no pack of this engine has probes", field="steering.method")
                if steering is not None and steering.composed and self.table.slots_per_request < 2:
                    raise SteeringError("a composition with a FASB member needs two steering slots per "
                                        "request, and this engine's table has one", field="steering")
        except Exception as exc:  # the front-end validates first; this only guards the worker
            self.record_failure(req_id, exc)
            return None
        self._requests[req_id] = steering
        return steering

    def apply_update(self, update: FasbUpdate, extra_args_of: Callable[[str], Mapping[str, Any] | None]) -> None:
        """A backtrack: steer the request from ``update.steer_from`` at ``update.strength``.

        Positions before ``update.steer_from`` keep their KV, so a request already steered by an
        earlier backtrack keeps that backtrack's scales for them (a recompute of a partly kept KV
        block must compute them as they were)."""
        current = self.steering_of(update.req_id, extra_args_of)
        if current is None or current.fasb is None:
            raise SteeringError(f"FASB update for request {update.req_id}, which this worker does not steer with FASB")
        steer_from = update.steer_from
        strengths = [update.strength] if update.adaptive else None
        if current.steer_from is not None and current.steer_from < update.steer_from:
            if current.composed:  # the spec check allows one backtrack in a composition
                raise SteeringError(f"second FASB backtrack of composed request {update.req_id}")
            steer_from = current.steer_from
            kept = [current.scale_at(q) for q in range(current.steer_from, update.steer_from)]
            strengths = kept + [update.strength]
        self._requests[update.req_id] = replace(
            current, steer_from=steer_from, monitor=update.monitor, strength=update.strength,
            strengths=strengths, adaptive=update.adaptive,
        )
        self._num_adaptive += update.adaptive and not current.adaptive

    def has_adaptive_strength(self, req_ids: Sequence[str]) -> bool:
        if not self._num_adaptive:
            return False
        return any((st := self._requests.get(r)) is not None and st.adaptive for r in req_ids)

    def note_scores(self, req_ids: Sequence[str], positions: Sequence[int], scores: Sequence[float]) -> None:
        """``strength="paper"``: a token's score sets the strength of the next position."""
        for req_id, position, p in zip(req_ids, positions, scores):
            steering = self._requests.get(req_id)
            if steering is None or not steering.adaptive:
                continue
            spec = steering.fasb[0]
            i = position + 1 - steering.steer_from
            if i < 1:
                continue
            del steering.strengths[i:]  # a recomputed position overwrites what follows it
            steering.strengths.extend([steering.strengths[-1]] * (i - len(steering.strengths)))
            steering.strengths.append(spec.alpha * (1.0 - p) if p < spec.threshold else 0.0)

    def forget(self, req_ids: Sequence[str]) -> None:
        for req_id in req_ids:
            steering = self._requests.pop(req_id, None)
            if steering is not None and steering.adaptive:
                self._num_adaptive -= 1
            self._l2s_vectors.pop(req_id, None)
            for gate in self.gates.values():  # a failed request (steering None) may hold a row too
                gate.release(req_id)
            self._gate_values.pop(req_id, None)
            self._gate_read_to.pop(req_id, None)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)

    @property
    def num_steered_requests(self) -> int:
        """Requests this worker knows that hold a steering slot (steered or monitored)."""
        return sum(steering is not None for steering in self._requests.values())

    # -- per step ------------------------------------------------------------------------------
    def plan_step(
        self,
        req_ids: Sequence[str],
        num_scheduled: np.ndarray,
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
        extra_args_of: Callable[[str], Mapping[str, Any] | None],
        num_tokens: np.ndarray | None = None,
    ) -> int:
        """Write this step's per-token slots; returns the number of tokens with a slot.

        ``num_tokens`` (each request's known length) tells which requests sample this step; only
        needed when some request is monitored."""
        self._stash_l2s_vectors()
        self._stash_gates()
        num_reqs = len(req_ids)
        counts = num_scheduled[:num_reqs].astype(np.int64)
        total = int(counts.sum())
        first_token = np.cumsum(counts) - counts
        num_prompt_of = num_prompt[:num_reqs].tolist()
        l2s_entries: dict[str, list[tuple[int, int, float]]] = {name: [] for name in self.predictors}
        gate_reads: dict[str, tuple[list, list]] = {name: ([], []) for name in self.gates}
        slot_of_req = np.zeros(num_reqs, dtype=np.int32)
        start_of_req = np.full(num_reqs, NO_STEERING, dtype=np.int64)
        second_slot_of_req = np.zeros(num_reqs, dtype=np.int32)
        second_start_of_req = np.full(num_reqs, NO_STEERING, dtype=np.int64)
        monitored: list[int] = []  # batch indices of monitored requests
        scaled: list[tuple[int, RequestSteering]] = []  # requests whose tokens carry a scale
        any_slot = False
        for i, req_id in enumerate(req_ids):
            try:
                planned = self._plan_request(
                    req_id, i + 1, extra_args_of, num_prompt_of[i], int(num_computed[i]), int(counts[i])
                )
                if planned is not None and planned[0].gate is not None:
                    self._plan_gate_read(req_id, planned[0], i + 1, int(first_token[i]), num_prompt_of[i],
                                         int(num_computed[i]), int(counts[i]), gate_reads)
            except Exception as exc:  # fails this request only (the scheduler finishes it)
                self._slot_owner[i + 1] = None  # the slot may be half written
                self.record_failure(req_id, exc)
                continue
            if planned is None:
                continue
            steering, start, l2s_offset = planned
            slot_of_req[i] = i + 1
            any_slot = True
            if steering.monitor:
                monitored.append(i)
            start_of_req[i] = start
            second = steering.second_steered()
            if second != NO_STEERING:
                second_slot_of_req[i] = self.table.second_slot(i + 1)
                second_start_of_req[i] = second
            if l2s_offset is not None:
                member, pack = steering.l2s
                l2s_entries[pack.name].append((int(first_token[i]) + l2s_offset, i + 1, float(member.alpha)))
                self._l2s_pending.append((req_id, i + 1, self.predictors[pack.name]))
                self.l2s_predictions += 1
            if start != NO_STEERING and steering.scaled:
                scaled.append((i, steering))
        self.monitored = self._monitored_tokens(
            req_ids, monitored, counts, first_token, num_computed, num_tokens
        )
        if self.monitored:
            m = len(self.monitored)
            self._host_monitored_rows[:m] = torch.from_numpy(self.monitored.rows)
            self._monitored_rows[:m].copy_(self._host_monitored_rows[:m], non_blocking=True)

        for name, predictor in self.predictors.items():
            predictor.set_step(l2s_entries[name])
        for name, gate in self.gates.items():
            gate.set_step(*gate_reads[name])
        if not any_slot:
            if self._dirty_tokens:
                self.table.token_slots[: self._dirty_tokens].zero_()
                self._dirty_tokens = 0
            self._write_scales(None, 0)
            return 0

        req_of_token = np.repeat(np.arange(num_reqs), counts)
        positions = num_computed[:num_reqs].astype(np.int64)[req_of_token] + (
            np.arange(total) - first_token[req_of_token]
        )
        token_slots = np.where(positions >= start_of_req[req_of_token], slot_of_req[req_of_token], 0)
        token_slots = np.where(positions >= second_start_of_req[req_of_token], second_slot_of_req[req_of_token],
                               token_slots)
        if self.monitored:  # probed on the slot its position uses (the first before any steering)
            index = self.monitored.batch_index
            token_slots[self.monitored.rows] = np.where(
                self.monitored.positions >= second_start_of_req[index], second_slot_of_req[index], slot_of_req[index]
            )
        host = self._host_slots[: max(total, self._dirty_tokens)]
        host.zero_()
        host[:total] = torch.from_numpy(token_slots.astype(np.int32))
        self.table.token_slots[: host.shape[0]].copy_(host, non_blocking=True)
        self._dirty_tokens = total

        scales = None
        if scaled:
            scales = np.ones(total, dtype=np.float32)
            for i, steering in scaled:
                rows = np.nonzero(req_of_token == i)[0]
                rows = rows[positions[rows] >= start_of_req[i]]
                if steering.strengths is None:
                    scales[rows] = steering.strength
                else:
                    scales[rows] = [steering.scale_at(int(q)) for q in positions[rows]]
        self._write_scales(scales, total)
        return int(np.count_nonzero(token_slots))

    def _write_slots(self, req_id: str, slot: int, steering: RequestSteering) -> None:
        """Fill the request's slot (and its second slot, after a composition's FASB backtrack)."""
        table = self.table
        if steering.fasb is not None and not steering.composed:  # FASB alone: its heads at the token scale
            spec, pack = steering.fasb
            table.write_sum(slot, [(spec, pack, 1.0)] if steering.steer_from is not None else [])
        else:
            table.write_sum(slot, [(spec, pack, float(spec.alpha)) for spec, pack in steering.added])
        if steering.l2s is not None:
            vector = self._l2s_vectors.get(req_id)  # the row it predicted (with the others' part)
            if vector is not None:
                self.predictors[steering.l2s[1].name].out_rows[slot].copy_(vector)
        if steering.monitor:
            self.probes.write_slot(slot, steering.fasb[1])
        if steering.gate is not None and req_id in self._gate_values:
            table.scale_slot(slot, self._gate_values[req_id])
        if steering.second_steered() != NO_STEERING:
            second = table.second_slot(slot)
            table.copy_slot(second, slot)
            spec, pack = steering.fasb
            table.add_to_slot(second, spec, pack, steering.strength)
            if steering.monitor:
                self.probes.write_slot(second, pack)

    def _plan_request(
        self,
        req_id: str,
        slot: int,
        extra_args_of: Callable[[str], Mapping[str, Any] | None],
        num_prompt: int,
        num_computed: int,
        num_scheduled: int,
    ) -> tuple[RequestSteering, int, int | None] | None:
        """One request's part of the step: (its steering, the first position its slot steers, the
        offset in its scheduled tokens of the last prompt token when the L2S predictor reads it this
        step), or None when it is not steered. Writes its slots when their owner or steering changed."""
        steering = self.steering_of(req_id, extra_args_of)
        if steering is None:
            return None
        owner = self._slot_owner[slot]
        if owner is None or owner[0] != req_id or owner[1] is not steering:
            self._write_slots(req_id, slot, steering)
            self._slot_owner[slot] = (req_id, steering)
        start = steering.first_steered(num_prompt)
        if steering.l2s is None:
            return steering, start, None
        last_prompt = num_prompt - 1
        if not self.predictors[steering.l2s[1].name].same_pass:  # L' > L* (the registry refuses prompt steering)
            start = max(start, last_prompt + 1)  # the vector arrives after layer L*: generated tokens only
        # L' <= L*: the first steered position (at most the last prompt token) is in the step that reads,
        # so under chunked prefill no earlier chunk carries the slot before its row is written
        reads_now = num_computed <= last_prompt < num_computed + num_scheduled
        if reads_now and req_id not in self._l2s_vectors:  # else resumed: its vector is in its slot
            return steering, start, last_prompt - num_computed
        return steering, start, None

    def _plan_gate_read(self, req_id: str, steering: RequestSteering, slot: int, first_row: int, num_prompt: int,
                        num_computed: int, num_scheduled: int, reads: dict[str, tuple[list, list]]) -> None:
        """A conditioned request's prompt tokens of this step go to its gate's running sum; with its
        last prompt token, the gate decides (``ConditionGate``)."""
        if req_id in self._gate_values:
            return  # decided; a recomputed prompt (after preemption) is steered as the gate said
        condition, pack = steering.gate
        gate = self.gates[pack.name]
        read_to = self._gate_read_to.get(req_id, 0)
        if num_computed != read_to:
            if num_computed != 0:
                raise SteeringError(
                    f"the condition of request {req_id} read its prompt up to position {read_to}, and this step "
                    f"starts at {num_computed}: prompt tokens were computed without being read",
                    field="steering.condition")
            gate.restart(req_id)  # preempted mid-prompt and recomputed from the start
        stop = min(num_computed + num_scheduled, num_prompt)
        if stop <= num_computed:
            raise SteeringError(f"request {req_id} is past its prompt and its condition was never decided",
                                field="steering.condition")
        row = gate.row_of(req_id)
        reads[pack.name][0].append((first_row, stop - num_computed, row))
        self._gate_read_to[req_id] = stop
        if stop == num_prompt:
            threshold = condition.threshold if condition.threshold is not None else gate.threshold
            above = (condition.comparison or gate.comparison) == "above"
            reads[pack.name][1].append((row, slot, num_prompt, float(threshold), above))
            self._gate_pending.append((req_id, gate))

    def _stash_gates(self) -> None:
        """Keep the gates decided in the last forward, and free their sum rows."""
        for req_id, gate in self._gate_pending:
            if req_id in self._requests:
                value = self._gate_values[req_id] = gate.gate_of(req_id)
                self._conditions_met.add_(value.sum())
                self.conditions_decided += 1
            gate.release(req_id)
        self._gate_pending = []

    @property
    def conditions_met(self) -> int:
        """How many decided CAST gates held (reads the device: for statistics, not per step)."""
        return int(self._conditions_met.item())

    def record_failure(self, req_id: str, exc: BaseException) -> None:
        """Stop steering ``req_id`` and report it (``take_failures``) so the scheduler fails it: a
        request is never run unsteered in place of the steering it asked for."""
        logger.error("vllm-steer: steering request %s failed on this worker: %s", req_id, exc, exc_info=exc)
        previous = self._requests.get(req_id)
        if previous is not None and previous.adaptive:
            self._num_adaptive -= 1
        self._requests[req_id] = None
        self._failed[req_id] = f"{type(exc).__name__}: {exc}"

    def take_failures(self) -> dict[str, str]:
        """Requests whose steering failed since the last call: req_id -> reason."""
        failed, self._failed = self._failed, {}
        return failed

    def _monitored_tokens(self, req_ids, monitored, counts, first_token, num_computed, num_tokens):
        """The newest token of each monitored request that samples this step (``num_tokens``: each
        request's known length; a step that reaches it samples)."""
        if not monitored:
            return NOTHING_MONITORED
        index = np.asarray(monitored, dtype=np.int64)
        end = num_computed[index].astype(np.int64) + counts[index]
        if num_tokens is not None:
            samples = end >= num_tokens[index]
            index, end = index[samples], end[samples]
            if index.shape[0] == 0:
                return NOTHING_MONITORED
        ids = [req_ids[i] for i in index.tolist()]
        by_pack: dict[str, tuple[SteerPack, list[int]]] = {}
        for m, req_id in enumerate(ids):
            pack = self._requests[req_id].fasb[1]
            group = by_pack.get(pack.name)
            if group is None:
                by_pack[pack.name] = (pack, [m])
            else:
                group[1].append(m)
        return MonitoredTokens(ids, index, first_token[index] + counts[index] - 1, end - 1, by_pack)

    def _stash_l2s_vectors(self) -> None:
        """Keep the vectors predicted in the last forward, so a request that moves to another slot
        (preemption, resume) takes its vector along and is never predicted twice."""
        for req_id, slot, predictor in self._l2s_pending:
            if req_id in self._requests:
                if req_id in self._l2s_vectors:
                    self.l2s_repeats += 1
                self._l2s_vectors[req_id] = predictor.out_rows[slot].clone()
        self._l2s_pending = []

    def _write_scales(self, scales: np.ndarray | None, total: int) -> None:
        if scales is None:
            if self._scaled_tokens:
                self.table.token_scales[: self._scaled_tokens].fill_(1.0)
                self._scaled_tokens = 0
            return
        host = self._host_scales[: max(total, self._scaled_tokens)]
        host.fill_(1.0)
        host[:total] = torch.from_numpy(scales)
        self.table.token_scales[: host.shape[0]].copy_(host, non_blocking=True)
        self._scaled_tokens = total
