"""Operator limits on what one request may cost: FASB backtracks are the one setting that multiplies
a request's work (each recomputes up to ``backtrack`` tokens), so a server caps them.

Set with ``vllm serve --steering-max-backtracks N --steering-max-backtrack-tokens S
--steering-max-recomputed-tokens R`` or ``additional_config={"steering": {"limits": {...}}}``.
A request over a limit is refused (HTTP 400) naming the field and the limit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vllm_steer.errors import SpecError
from vllm_steer.spec import MAX_BACKTRACK, Steering, SteeringSpec, for_each_member

DEFAULT_MAX_BACKTRACKS = 8
DEFAULT_MAX_BACKTRACK_TOKENS = 64
DEFAULT_MAX_RECOMPUTED_TOKENS = 256


class OperatorLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_backtracks: int = Field(
        default=DEFAULT_MAX_BACKTRACKS, ge=0, le=64, description="most FASB backtracks one request may ask for",
    )
    max_backtrack_tokens: int = Field(
        default=DEFAULT_MAX_BACKTRACK_TOKENS, ge=0, le=MAX_BACKTRACK,
        description="most tokens one FASB backtrack may drop (the spec's backtrack, s)",
    )
    max_recomputed_tokens: int = Field(
        default=DEFAULT_MAX_RECOMPUTED_TOKENS, ge=0, le=1 << 20,
        description="most generated tokens one request's backtracks may recompute in all "
        "(backtrack * max_backtracks, its worst case)",
    )

    def check(self, spec: Steering) -> None:
        """Raise SpecError naming the field when ``spec`` (or a member of a composition) asks for more
        than these limits allow."""
        for_each_member(spec, self._check_one)

    def _check_one(self, spec: SteeringSpec) -> None:
        if not spec.monitored:
            return
        if spec.max_backtracks > self.max_backtracks:
            raise SpecError(
                f"steering.max_backtracks {spec.max_backtracks} is over this server's limit of "
                f"{self.max_backtracks} (--steering-max-backtracks)",
                field="steering.max_backtracks",
            )
        if spec.backtrack > self.max_backtrack_tokens:
            raise SpecError(
                f"steering.backtrack {spec.backtrack} is over this server's limit of "
                f"{self.max_backtrack_tokens} tokens (--steering-max-backtrack-tokens)",
                field="steering.backtrack",
            )
        worst = spec.backtrack * spec.max_backtracks
        if worst > self.max_recomputed_tokens:
            raise SpecError(
                f"steering.max_backtracks {spec.max_backtracks} x steering.backtrack {spec.backtrack} may "
                f"recompute {worst} tokens, over this server's limit of {self.max_recomputed_tokens} "
                "(--steering-max-recomputed-tokens)",
                field="steering.max_backtracks",
            )
