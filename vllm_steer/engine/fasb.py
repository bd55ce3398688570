"""FASB on the scheduler side: when to backtrack, how far, how strongly, and what the client may see.

Pure bookkeeping in our own types; ``integration/scheduler.py`` applies the decisions to vLLM's
requests and outputs. Semantics (greedy parity with ``tests/reference/hf_fasb.py``):

* Each step that samples a token for a monitored request also returns ``p`` = the mean P(desired)
  of the pack's K probes at the token that step computed (its newest input token).
* With ``G`` generated tokens after the step, the step is checked when ``G >= spec.first_check`` or
  when the step would finish the request (length, EOS, stop token). A check fires when
  ``p < spec.threshold`` and backtracks remain (and, on a finishing step, when it would drop a
  token: with ``s = 0`` there is nothing to regenerate).
* Firing keeps ``G - s`` generated tokens (none when ``G <= s``), sets the strength to
  ``alpha * (1 - p)`` (for good with ``strength="code"``; re-set by the workers every step with
  ``"paper"``), and steers every position from the last kept token on (the last prompt token when
  nothing is kept): that token is recomputed under steering, so the first regenerated token already
  feels it.
* Commit horizon: a monitored request's tokens reach the client only once no later check can
  retract them, or when it finishes, or when it can no longer backtrack. With ``r`` backtracks left,
  the worst case is that every one of them fires as early as it can: the next step (G + 1 tokens)
  keeps G + 1 - s; the step after that backtrack keeps (G + 1 - s) + 1 - s, and so on. So only the
  first ``G - r * (s - 1)`` tokens are safe (``G + 1 - s`` when one backtrack is left). A check can
  come at any G, whatever ``min_tokens`` says, because the step that finishes a request (EOS, stop
  token) is always checked.
* Stop strings: vLLM (0.26 and 0.32) matches them in the front-end's detokenizer, on the tokens
  released to it, and then aborts the request in the engine; the engine core only matches EOS, stop
  token ids and lengths (``check_stop``). So a stop string completed by generated token q ends the
  request once q is released (G >= q + r * (s - 1)): every check that could still drop a token
  up to q has run by then, and the checks it skips (later ones, the forced one at ``max_tokens``)
  keep at least q tokens. The text before the stop string is the one a run to ``max_tokens`` without
  stop strings would have (``tests/test_fasb_truthfulqa_gen.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_steer.engine.count_histogram import CountHistogram
from vllm_steer.spec import Steering, SteeringSpec


@dataclass(frozen=True)
class FasbUpdate:
    """Scheduler -> workers: how a request is steered after a backtrack.

    Positions before ``steer_from`` keep the KV they were computed with, steered or not: after a
    second backtrack, positions an earlier one steered keep that earlier strength (the workers keep
    the per-position history themselves)."""

    req_id: str
    strength: float  # what the pack's unit-alpha ITI rows are scaled by: alpha * (1 - p)
    steer_from: int  # first position this backtrack recomputes, steered
    monitor: bool  # whether the workers keep scoring it
    adaptive: bool = False  # strength="paper": the workers re-set the strength every step
    # (first position, strength) of every backtrack whose steered positions are still in the KV,
    # this one last: what the request's KV depends on
    segments: tuple[tuple[int, float], ...] = ()

    def cache_key(self, spec: Steering, num_prompt_tokens: int = 0) -> tuple[str, int]:
        """The prefix-cache key of KV computed under this steering (see integration/prefix_cache),
        and the first position it applies to: the first this or an earlier backtrack steered, or,
        for a composition, the first its other members steer when that is earlier.

        Adaptive strengths depend on the request's own scores: its steered KV is never shared."""
        segments = self.segments or ((self.steer_from, self.strength),)
        own = f"|request:{self.req_id}" if self.adaptive else ""
        first = segments[0][0]
        static_start = spec.steer_start(num_prompt_tokens)
        if static_start is not None:
            first = min(first, static_start)
        return (f"{spec.cache_key()}|fasb:{list(segments)!r}{own}", first)


@dataclass(frozen=True)
class Backtrack:
    keep: int  # generated tokens kept
    score: float  # the mean P(desired) that fired
    update: FasbUpdate


@dataclass
class FasbRequest:
    spec: SteeringSpec  # the FASB spec (a member, when the request composes several)
    num_prompt_tokens: int
    request_spec: Steering | None = None  # what the request asked, when that is a composition
    backtracks: int = 0
    recomputed_tokens: int = 0  # generated tokens dropped by backtracks
    released: int = 0  # generated tokens the client has been sent
    held_tokens: list[int] = field(default_factory=list)
    held_logprobs: list[Any] = field(default_factory=list)  # one opaque row per held token
    carried: dict[str, Any] = field(default_factory=dict)  # parts of dropped outputs to send later
    segments: list[tuple[int, float]] = field(default_factory=list)  # see FasbUpdate.segments
    freed: bool = False

    @property
    def checking(self) -> bool:
        return self.backtracks < self.spec.max_backtracks

    def releasable(self, finished: bool) -> int:
        """How many held tokens may go to the client now."""
        if finished or not self.checking:
            return len(self.held_tokens)
        return max(0, min(len(self.held_tokens), self.safe_prefix() - self.released))

    def safe_prefix(self) -> int:
        """How many generated tokens every later check keeps, whatever the scores (see the module
        docstring: each remaining backtrack may fire at the earliest step it can)."""
        generated = self.released + len(self.held_tokens)
        remaining = self.spec.max_backtracks - self.backtracks
        return min(generated, generated - remaining * (self.spec.backtrack - 1))

    def truncate(self, num_generated: int) -> None:
        """Forget held tokens past ``num_generated`` (after a backtrack)."""
        keep = num_generated - self.released
        if keep < 0:
            raise AssertionError(
                f"FASB released {self.released} tokens but a backtrack kept only {num_generated}"
            )
        del self.held_tokens[keep:]
        del self.held_logprobs[keep:]


class FasbController:
    def __init__(self) -> None:
        self.requests: dict[str, FasbRequest] = {}
        self.num_checks = 0  # probe scores compared with a threshold
        self.num_backtracks = 0
        self.num_recomputed_tokens = 0
        self.recomputed_per_request = CountHistogram()  # observed when a request is forgotten

    def track(self, req_id: str, spec: Steering, num_prompt_tokens: int) -> None:
        """Follow a request whose spec (or one member of whose composition) is FASB."""
        fasb = spec.fasb
        if fasb is None:
            raise ValueError(f"request {req_id} has no FASB spec to track")
        self.requests[req_id] = FasbRequest(fasb, num_prompt_tokens, request_spec=spec)

    def check(self, req_id: str, score: float, num_generated: int, final: bool) -> Backtrack | None:
        """The check after a step that left ``num_generated`` tokens and scored ``score``."""
        state = self.requests.get(req_id)
        if state is None or not state.checking:
            return None
        spec = state.spec
        if not (final or num_generated >= spec.first_check):
            return None
        self.num_checks += 1
        if not score < spec.threshold:
            return None
        keep = num_generated - spec.backtrack if num_generated > spec.backtrack else 0
        if final and keep == num_generated:
            return None  # s = 0 on the finishing step: nothing would be regenerated
        state.backtracks += 1
        state.recomputed_tokens += num_generated - keep
        self.num_backtracks += 1
        self.num_recomputed_tokens += num_generated - keep
        strength = spec.alpha * (1.0 - score)
        steer_from = state.num_prompt_tokens + keep - 1
        state.segments = [seg for seg in state.segments if seg[0] < steer_from] + [(steer_from, strength)]
        update = FasbUpdate(
            req_id=req_id,
            strength=strength,
            steer_from=steer_from,
            monitor=state.checking or spec.strength == "paper",
            adaptive=spec.strength == "paper",
            segments=tuple(state.segments),
        )
        return Backtrack(keep=keep, score=score, update=update)

    def forget(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.recomputed_per_request.observe(state.recomputed_tokens)
