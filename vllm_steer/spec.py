"""The per-request steering spec, carried in ``SamplingParams.extra_args``.

Two spellings are accepted:

* nested (offline ``LLM``, the server's ``steering`` body field)::

      extra_args={"steering": {"pack": "truthful", "method": "iti", "alpha": 8.0}}

* flat (OpenAI ``vllm_xargs``, which only carries flat values)::

      extra_args={"steering_pack": "truthful", "steering_method": "iti", "steering_alpha": 8.0}

Both parse into one frozen ``SteeringSpec``. ``resolve_spec`` then checks it against the packs an
engine has loaded, so an unknown pack or a head the pack does not steer is refused before the
request enters the engine.

A request may also carry a *composition*: a list of specs, summed per position (``ComposedSpec``)::

      extra_args={"steering": [{"pack": "truthful", "method": "iti", "alpha": 8.0},
                               {"pack": "polite", "method": "residual", "alpha": 2.0, "layers": [3]}]}

and, flat, the same list (or one object) as a JSON string in ``steering_json``::

      extra_args={"steering_json": '[{"pack": "truthful", "alpha": 8.0}, {"pack": "polite", ...}]'}

Errors in a member name it by its index: ``steering[1].alpha`` (``steering_json[1].alpha``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from vllm_steer.errors import SpecError

SPEC_KEY = "steering"
FLAT_PREFIX = "steering_"
JSON_KEY = "steering_json"  # the flat form's one key for a composition (or any spec) as JSON text
MAX_COMPOSED = 16  # specs in one composition
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


class ConditionRequest(BaseModel):
    """CAST: steer the request only when its prompt meets the condition of a condition pack
    (``vllm-steer fit cast``). ``threshold`` / ``comparison`` override the pack's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pack: str = Field(min_length=1, max_length=128)
    threshold: Number | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)
    comparison: Literal["above", "below"] | None = None


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

    ``condition`` (CAST) names a condition pack (or ``{"pack": ..., "threshold": ..., "comparison":
    ...}``): the request is steered only when its prompt meets the condition, decided in its prefill
    from the mean of the stream entering the pack's layer over every prompt token.
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
    condition: ConditionRequest | None = None

    @field_validator("condition", mode="before")
    @classmethod
    def _condition_by_name(cls, v: Any) -> Any:
        return {"pack": v} if isinstance(v, str) else v

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
        if self.condition is not None:
            if self.method in ("fasb", "l2s", "off"):
                why = {
                    "fasb": "FASB decides per generated token whether to steer, a condition once per prompt",
                    "l2s": "conditioning an L2S predictor's vector is not supported",
                    "off": "method 'off' steers nothing to gate",
                }[self.method]
                raise _FieldError("condition", f"condition does not apply to method {self.method!r}: {why}")
            if self.steer_from is not None or self.prompt_positions == "all":
                raise _FieldError(
                    "steer_from" if self.steer_from is not None else "prompt_positions",
                    "a conditioned spec steers from the last prompt token ('last') or generated tokens only "
                    "('none'): the condition is known only once the whole prompt went through its layer",
                )
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

    @property
    def members(self) -> tuple[SteeringSpec, ...]:
        """The specs this request's steering is the sum of: itself (a ``ComposedSpec`` has several)."""
        return (self,)

    @property
    def fasb(self) -> SteeringSpec | None:
        """The member the probes monitor and backtracks steer, if any."""
        return self if self.monitored else None

    @property
    def gate(self) -> ConditionRequest | None:
        """The condition the request's steering waits for (CAST), if any."""
        return self.condition if self.active else None

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


@dataclass(frozen=True)
class ComposedSpec:
    """Several specs on one request, their steering summed per position (``parse_spec`` builds it
    from a list and checks the rules below; a list of one is that spec, not a composition).

    * At most one FASB member and one L2S member.
    * Every member but the FASB one steers the same positions (``prompt_positions`` /
      ``steer_from``): a request has one steering slot per position, holding the members' sum.
    * Every member steering something carries the same ``condition`` or none does: the condition
      gates the request's one slot.
    * With a FASB member, the others steer from the last prompt token (``"last"``) or every prompt
      token (``"all"``), and the FASB member keeps ``strength="code"`` and ``max_backtracks <= 1``:
      after its backtrack the request's positions use a second slot holding the others' sum plus
      the FASB heads at the backtrack's strength, so that strength is one number.
    """

    members: tuple[SteeringSpec, ...]

    @property
    def active(self) -> bool:
        return any(m.active for m in self.members)

    @property
    def monitored(self) -> bool:
        return any(m.monitored for m in self.members)

    @property
    def method(self) -> str:
        return "composed"

    @property
    def fasb(self) -> SteeringSpec | None:
        return next((m for m in self.members if m.monitored), None)

    @property
    def gate(self) -> ConditionRequest | None:
        """The members' common condition (``parse_spec`` checks they share it)."""
        return next((m.condition for m in self.members if m.active and m.condition is not None), None)

    def cache_key(self) -> str:
        return json.dumps([m.model_dump(mode="json") for m in self.members], sort_keys=True, separators=(",", ":"))

    def steer_start(self, num_prompt_tokens: int) -> int | None:
        """The first position the members other than FASB steer (they share it); None when only
        a FASB member is active."""
        starts = [m.steer_start(num_prompt_tokens) for m in self.members if m.active and not m.monitored]
        return min(starts) if starts else None

    def model_dump(self, mode: str = "json") -> list[dict]:
        """The composition as plain data (the list form ``parse_spec`` reads back)."""
        return [m.model_dump(mode=mode) for m in self.members]


Steering = Union[SteeringSpec, ComposedSpec]
_T = TypeVar("_T")


def member_error(exc: SpecError, index: int) -> SpecError:
    """``exc`` about one member, respelled to name it: ``steering.alpha`` -> ``steering[1].alpha``."""
    field = exc.field or SPEC_KEY
    named = f"{SPEC_KEY}[{index}]"
    field = named + field[len(SPEC_KEY):] if field.startswith(SPEC_KEY + ".") or field == SPEC_KEY else field
    message = re.sub(rf"\b{SPEC_KEY}\.(\w)", rf"{named}.\1", str(exc))
    return type(exc)(message, field=field)


def for_each_member(spec: Steering, check: Callable[[SteeringSpec], _T]) -> list[_T]:
    """``check`` on each member; a SpecError it raises names the member (``steering[i].field``)
    when ``spec`` is a composition."""
    if isinstance(spec, SteeringSpec):
        return [check(spec)]
    results = []
    for i, member in enumerate(spec.members):
        try:
            results.append(check(member))
        except SpecError as exc:
            raise member_error(exc, i) from None
    return results


def _condition_text(condition: ConditionRequest | None) -> str:
    return "no condition" if condition is None else clip(json.dumps(condition.model_dump(exclude_none=True)))


def _check_composition(members: Sequence[SteeringSpec]) -> None:
    """The rules of ``ComposedSpec``; SpecError naming the member's field."""
    first_of: dict[str, int] = {}
    for i, m in enumerate(members):
        if m.method in ("fasb", "l2s"):
            if m.method in first_of:
                raise SpecError(
                    f"invalid steering spec: {SPEC_KEY}[{i}].method: a request may compose at most one "
                    f"{m.method!r} spec ({SPEC_KEY}[{first_of[m.method]}] is one)",
                    field=f"{SPEC_KEY}[{i}].method",
                )
            first_of[m.method] = i
    gated = [(i, m) for i, m in enumerate(members) if m.active]
    if gated and any(m.condition != gated[0][1].condition for _, m in gated):
        i, m = next((i, m) for i, m in gated if m.condition != gated[0][1].condition)
        i0 = gated[0][0]
        raise SpecError(
            f"invalid steering spec: {SPEC_KEY}[{i}].condition: the members of a composition share one condition "
            f"or none (it gates the request's steering as a whole); {SPEC_KEY}[{i0}] has "
            f"{_condition_text(gated[0][1].condition)}, {SPEC_KEY}[{i}] has {_condition_text(m.condition)}",
            field=f"{SPEC_KEY}[{i}].condition",
        )
    steered = [(i, m) for i, m in enumerate(members) if m.method not in ("fasb", "off")]
    positions = {(m.prompt_positions, m.steer_from) for _, m in steered}
    if len(positions) > 1:
        i0, m0 = steered[0]
        i, m = next((i, m) for i, m in steered if (m.prompt_positions, m.steer_from) != (m0.prompt_positions, m0.steer_from))
        name = "steer_from" if m.steer_from is not None or m0.steer_from is not None else "prompt_positions"

        def where(mm: SteeringSpec) -> str:
            return f"steer_from {mm.steer_from}" if mm.steer_from is not None else f"prompt_positions {mm.prompt_positions!r}"

        raise SpecError(
            f"invalid steering spec: {SPEC_KEY}[{i}].{name}: the members of a composition steer the same "
            f"positions (one slot per position holds their sum); {SPEC_KEY}[{i0}] has {where(m0)}, "
            f"{SPEC_KEY}[{i}] has {where(m)}",
            field=f"{SPEC_KEY}[{i}].{name}",
        )
    if "fasb" not in first_of or not steered:
        return
    f = first_of["fasb"]
    fasb = members[f]
    if fasb.strength != "code":
        raise SpecError(
            f"invalid steering spec: {SPEC_KEY}[{f}].strength: in a composition FASB steers at one strength "
            "per backtrack ('code'); 'paper' re-sets it every token, which only a FASB spec on its own can do",
            field=f"{SPEC_KEY}[{f}].strength",
        )
    if fasb.max_backtracks > 1:
        raise SpecError(
            f"invalid steering spec: {SPEC_KEY}[{f}].max_backtracks: in a composition FASB backtracks at most "
            f"once (got {fasb.max_backtracks}); more backtracks need a FASB spec on its own",
            field=f"{SPEC_KEY}[{f}].max_backtracks",
        )
    i, m = steered[0]
    if m.steer_from is not None or m.prompt_positions == "none":
        name = "steer_from" if m.steer_from is not None else "prompt_positions"
        raise SpecError(
            f"invalid steering spec: {SPEC_KEY}[{i}].{name}: next to a FASB spec the other members steer from the "
            "last prompt token ('last') or every prompt token ('all'), where FASB's backtracks never reach",
            field=f"{SPEC_KEY}[{i}].{name}",
        )


def field_name(names: list[str], root: str = SPEC_KEY) -> str:
    """The field as the client spelled it: ``steering.alpha`` under the nested ``root`` (or
    ``steering[1].alpha``, ``steering_json.alpha``), ``steering_alpha`` for flat keys (``root`` is
    ``FLAT_PREFIX``)."""
    if root == FLAT_PREFIX:
        return FLAT_PREFIX + ".".join(names) if names else SPEC_KEY
    return ".".join([root, *names])


def respell_flat(exc: SpecError) -> SpecError:
    """``exc`` with its field (and the field's mention in its message) in the flat spelling, for a
    spec that came as flat ``steering_*`` keys."""
    field = exc.field
    if not field or not field.startswith(SPEC_KEY + "."):
        return exc
    message = re.sub(rf"\b{SPEC_KEY}\.(\w)", rf"{FLAT_PREFIX}\1", str(exc))
    return SpecError(message, field=FLAT_PREFIX + field[len(SPEC_KEY) + 1:])


def respell_json(exc: SpecError) -> SpecError:
    """``exc`` naming ``steering_json`` where it says ``steering``, for a spec sent as that key."""
    field = exc.field
    if not field or not (field == SPEC_KEY or field.startswith((SPEC_KEY + ".", SPEC_KEY + "["))):
        return exc
    message = re.sub(rf"\b{SPEC_KEY}(?=[.\[])", JSON_KEY, str(exc))
    return SpecError(message, field=JSON_KEY + field[len(SPEC_KEY):])


def respell(exc: SpecError, extra_args: Mapping[str, Any] | None) -> SpecError:
    """``exc`` (raised about the nested spelling, e.g. by a pack check) in the spelling the client
    used in ``extra_args``."""
    if not is_flat(extra_args):
        return exc
    return respell_json(exc) if JSON_KEY in extra_args else respell_flat(exc)


def _raise_from_validation(exc: ValidationError, root: str) -> None:
    err = exc.errors()[0]
    names = [clip(str(p), 64) for p in err["loc"] if not isinstance(p, int)]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        names = [cause.field]
        message = str(cause)
    else:
        message = err["msg"]
    field = field_name(names, root)
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
    """Whether ``extra_args`` carries its spec as flat ``steering_*`` keys (``steering_json`` included)."""
    return bool(extra_args) and SPEC_KEY not in extra_args and any(k.startswith(FLAT_PREFIX) for k in extra_args)


def _one_spec(raw: Any, root: str) -> SteeringSpec:
    if isinstance(raw, SteeringSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"invalid steering spec: {root} must be an object, got {type(raw).__name__}", field=root)
    try:
        return SteeringSpec.model_validate(dict(raw))
    except ValidationError as exc:
        _raise_from_validation(exc, root)
    raise AssertionError("unreachable")


def _spec_or_composition(raw: Any, root: str) -> Steering:
    """A spec from an object, a composition from a list of them (a list of one: that spec)."""
    if isinstance(raw, ComposedSpec):
        return raw
    if not isinstance(raw, (list, tuple)):
        if not isinstance(raw, (Mapping, SteeringSpec)):
            raise SpecError(
                f"invalid steering spec: {root} must be an object or a list of objects, got {type(raw).__name__}",
                field=root,
            )
        return _one_spec(raw, root)
    if not 1 <= len(raw) <= MAX_COMPOSED:
        raise SpecError(
            f"invalid steering spec: {root} lists {len(raw)} specs; a composition has 1 to {MAX_COMPOSED}",
            field=root,
        )
    members = tuple(_one_spec(item, f"{root}[{i}]") for i, item in enumerate(raw))
    if len(members) == 1:
        return members[0]
    try:
        _check_composition(members)
    except SpecError as exc:
        raise (respell_json(exc) if root == JSON_KEY else exc) from None
    return ComposedSpec(members)


def _from_json_key(extra_args: Mapping[str, Any]) -> Steering:
    others = sorted(k for k in extra_args if k.startswith(FLAT_PREFIX) and k != JSON_KEY)
    if others:
        raise SpecError(
            f"give the steering spec either as {JSON_KEY} or as other steering_* keys, not both "
            f"(also got {clip(', '.join(others))})",
            field=JSON_KEY,
        )
    text = extra_args[JSON_KEY]
    if not isinstance(text, str):
        raise SpecError(
            f"invalid steering spec: {JSON_KEY} must be a string of JSON (an object or a list of them), "
            f"got {type(text).__name__}",
            field=JSON_KEY,
        )
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SpecError(f"invalid steering spec: {JSON_KEY} is not JSON: {clip(str(exc))}", field=JSON_KEY) from None
    return _spec_or_composition(raw, JSON_KEY)


def parse_spec(extra_args: Mapping[str, Any] | None) -> Steering | None:
    """Parse the spec (or composition) from ``SamplingParams.extra_args``; None when the request
    asks for none."""
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
        return _spec_or_composition(nested, SPEC_KEY)
    if JSON_KEY in extra_args:
        return _from_json_key(extra_args)
    return _one_spec(_unflatten(extra_args), FLAT_PREFIX)
