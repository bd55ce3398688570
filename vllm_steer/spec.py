"""The per-request steering spec, carried in ``SamplingParams.extra_args``.

Two spellings are accepted:

* nested (offline ``LLM``, the server's ``steering`` body field)::

      extra_args={"steering": {"pack": "truthful", "method": "iti", "alpha": 8.0}}

* flat (OpenAI ``vllm_xargs``, which only carries flat values)::

      extra_args={"steering_pack": "truthful", "steering_method": "iti", "steering_alpha": 8.0}

Both parse into one frozen ``SteeringSpec``. ``resolve_spec`` then checks it against the packs an
engine has loaded, so an unknown pack or a head the pack does not steer is refused before the
request enters the engine.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from vllm_steer.errors import SpecError

SPEC_KEY = "steering"
FLAT_PREFIX = "steering_"
MAX_ABS_ALPHA = 1e4

SteerMethod = Literal["iti", "residual", "fasb", "l2s", "mean_s", "off"]
FASB_FIELDS = ("threshold", "backtrack", "min_tokens", "max_backtracks", "strength")
StrengthRule = Literal["code", "paper"]
MAX_BACKTRACK = 1024
PromptPositions = Literal["last", "all", "none"]
MAX_ECHO = 200  # characters of a client's value or key quoted back in an error message
# JSON numbers only: "8" or true for a float, "2" or 2.0 for an int are refused, not coerced
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict()]


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters for an error message (a client's value can be huge)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _FieldError(ValueError):
    """A cross-field rule broken by the spec; ``field`` is the one the client should change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class SteeringSpec(BaseModel):
    """What one request asks for.

    ``prompt_positions`` picks which prompt tokens are steered (generated tokens always are):
    ``last`` = the last prompt token only (ITI's reference code), ``all`` = every prompt token,
    ``none`` = generated tokens only. ``steer_from`` instead steers every position from that absolute
    position on (used by FASB's multiple-choice scoring).

    ``method="fasb"`` (flexible activation steering with backtracking) steers nothing at first: the
    pack's probes score every new token, and when the mean P(desired) falls below ``threshold``
    (checked once at least ``min_tokens`` tokens exist, and on the step that would finish the
    request) the last ``backtrack`` generated tokens are dropped and regenerated with ITI steering
    at strength ``alpha * (1 - p)`` from the last kept token onwards. ``strength="code"`` (FASB's
    released code) keeps that strength fixed; ``strength="paper"`` (the paper's
    ``r = 1[p_undesired > beta] * p_undesired * alpha``) re-evaluates it every step after the
    backtrack: each new token is steered at ``alpha * (1 - p)`` of the previous token's score, or not
    at all when that score is at or above ``threshold``. At most ``max_backtracks`` backtracks per
    request (0 = score only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pack: str | None = Field(default=None, min_length=1, max_length=128)
    method: SteerMethod = "iti"
    alpha: Number = Field(default=1.0, allow_inf_nan=False, ge=-MAX_ABS_ALPHA, le=MAX_ABS_ALPHA)
    layers: tuple[Integer, ...] | None = Field(default=None, min_length=1, max_length=1024)
    heads: tuple[tuple[Integer, Integer], ...] | None = Field(default=None, min_length=1, max_length=1 << 16)
    prompt_positions: PromptPositions = "last"
    steer_from: Integer | None = Field(default=None, ge=0, le=1 << 24)
    threshold: Number = Field(default=0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    backtrack: Integer = Field(default=10, ge=0, le=MAX_BACKTRACK)
    min_tokens: Integer | None = Field(default=None, ge=1, le=1 << 20)
    max_backtracks: Integer = Field(default=1, ge=0, le=64)
    strength: StrengthRule = "code"

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            if len(set(v)) != len(v):
                raise ValueError("layers must not repeat")
            if min(v) < 0:
                raise ValueError("layers must be >= 0")
            v = tuple(sorted(v))
        return v

    @field_validator("heads")
    @classmethod
    def _unique_heads(cls, v: tuple[tuple[int, int], ...] | None) -> tuple[tuple[int, int], ...] | None:
        if v is not None:
            if len(set(v)) != len(v):
                raise ValueError("heads must not repeat")
            if any(l < 0 or h < 0 for l, h in v):
                raise ValueError("heads entries are [layer, head] pairs of indices >= 0")
            v = tuple(sorted(v))
        return v

    @model_validator(mode="after")
    def _pack_needed(self) -> SteeringSpec:
        if self.method != "off" and self.pack is None:
            raise _FieldError("pack", f"method {self.method!r} needs a pack")
        if self.heads is not None and self.method not in ("iti", "fasb"):
            raise _FieldError("heads", "heads selects ITI heads; it needs method 'iti' or 'fasb'")
        if self.method == "l2s":
            if self.prompt_positions == "all" or self.steer_from is not None:
                raise _FieldError(
                    "steer_from" if self.steer_from is not None else "prompt_positions",
                    "l2s steers from the last prompt token ('last') or generated tokens only ('none'): its "
                    "vector is known only once the whole prompt went through layer L'",
                )
            if self.layers is not None:
                raise _FieldError("layers", "layers does not apply to method 'l2s' (the pack names its layer)")
        if self.method == "mean_s" and self.layers is not None:
            raise _FieldError("layers", "layers does not apply to method 'mean_s' (the pack names its layer)")
        if self.steer_from is not None:
            if self.method == "fasb":
                raise _FieldError(
                    "steer_from", "steer_from does not apply to method 'fasb' (it steers from its backtrack)"
                )
            if "prompt_positions" in self.model_fields_set:
                raise _FieldError("steer_from", "give prompt_positions or steer_from, not both")
        if self.method != "fasb":
            misplaced = [f for f in FASB_FIELDS if f in self.model_fields_set]
            if misplaced:
                raise _FieldError(misplaced[0], f"{misplaced[0]} applies to method 'fasb' only")
        return self

    @property
    def active(self) -> bool:
        return self.method != "off" and self.alpha != 0.0

    @property
    def monitored(self) -> bool:
        """Whether the engine scores this request's tokens with the pack's probes (FASB)."""
        return self.method == "fasb" and self.active

    @property
    def first_check(self) -> int:
        """FASB: the number of generated tokens from which every step is checked."""
        return self.min_tokens if self.min_tokens is not None else max(self.backtrack, 1)

    def cache_key(self) -> str:
        """A canonical string: two specs with the same key steer identically."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def steer_start(self, num_prompt_tokens: int) -> int | None:
        """The first position this spec steers, for a prompt of ``num_prompt_tokens`` tokens.

        None for FASB: it steers only after a backtrack, from a position known then."""
        if self.method == "fasb":
            return None
        if self.steer_from is not None:
            return self.steer_from
        if self.prompt_positions == "all":
            return 0
        if self.prompt_positions == "last":
            return max(num_prompt_tokens - 1, 0)
        return num_prompt_tokens


def field_name(names: list[str], flat: bool) -> str:
    """The field as the client spelled it: ``steering.alpha`` (nested) or ``steering_alpha`` (flat)."""
    if not names:
        return SPEC_KEY
    return FLAT_PREFIX + ".".join(names) if flat else ".".join([SPEC_KEY, *names])


def respell_flat(exc: SpecError) -> SpecError:
    """``exc`` with its field (and the field's mention in its message) in the flat spelling, for a
    spec that came as flat ``steering_*`` keys."""
    field = exc.field
    if not field or not field.startswith(SPEC_KEY + "."):
        return exc
    message = re.sub(rf"\b{SPEC_KEY}\.(\w)", rf"{FLAT_PREFIX}\1", str(exc))
    return SpecError(message, field=FLAT_PREFIX + field[len(SPEC_KEY) + 1:])


def _raise_from_validation(exc: ValidationError, flat: bool) -> None:
    err = exc.errors()[0]
    names = [clip(str(p), 64) for p in err["loc"] if not isinstance(p, int)]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        names = [cause.field]
        message = str(cause)
    else:
        message = err["msg"]
    field = field_name(names, flat)
    value = err.get("input")
    shown = f" (got {clip(repr(value))})" if not isinstance(value, (dict, list)) else ""
    raise SpecError(f"invalid steering spec: {field}: {message}{shown}", field=field) from None


def _unflatten(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k[len(FLAT_PREFIX):]: v for k, v in extra_args.items() if k.startswith(FLAT_PREFIX)}
    heads = flat.get("heads")
    # vllm_xargs carries only flat lists: heads come as [l0, h0, l1, h1, ...].
    if isinstance(heads, list) and heads and not isinstance(heads[0], (list, tuple)):
        if len(heads) % 2:
            raise SpecError(
                "invalid steering spec: steering_heads is a flat list of layer, head pairs "
                "and needs an even length",
                field="steering_heads",
            )
        flat["heads"] = [heads[i : i + 2] for i in range(0, len(heads), 2)]
    return flat


def is_flat(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether ``extra_args`` carries its spec as flat ``steering_*`` keys."""
    return bool(extra_args) and SPEC_KEY not in extra_args and any(k.startswith(FLAT_PREFIX) for k in extra_args)


def parse_spec(extra_args: Mapping[str, Any] | None) -> SteeringSpec | None:
    """Parse the spec from ``SamplingParams.extra_args``; None when the request asks for none."""
    if not extra_args:
        return None
    nested = extra_args.get(SPEC_KEY)
    has_flat = any(k.startswith(FLAT_PREFIX) for k in extra_args)
    if nested is None and not has_flat:
        return None
    if nested is not None and has_flat:
        raise SpecError(
            "give the steering spec either as 'steering' or as flat 'steering_*' keys, not both",
            field=SPEC_KEY,
        )
    if nested is not None:
        if isinstance(nested, SteeringSpec):
            return nested
        if not isinstance(nested, Mapping):
            raise SpecError(
                f"invalid steering spec: steering must be an object, got {type(nested).__name__}",
                field=SPEC_KEY,
            )
        raw = dict(nested)
    else:
        raw = _unflatten(extra_args)
    try:
        return SteeringSpec.model_validate(raw)
    except ValidationError as exc:
        _raise_from_validation(exc, flat=nested is None)
    raise AssertionError("unreachable")

