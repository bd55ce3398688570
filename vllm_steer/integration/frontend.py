"""Front-end hooks (the process that owns ``LLM`` or the API server).

* ``EngineArgs.create_engine_config``: when ``additional_config["steering"]`` is present, load and
  validate every pack against the model once, before any engine process starts; a bad pack stops
  start-up with an error naming the file.
* ``SamplingParams._verify_args``: the spec's own form is checked when SamplingParams is built.
* ``SamplingParams.verify``: vLLM calls it in the input processor with the engine's ModelConfig;
  there the spec is checked against that engine's packs, before the request enters the engine.
Errors are raised as vLLM's ``VLLMValidationError`` (HTTP 400 on the server) naming the field.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from vllm_steer.config import ADDITIONAL_CONFIG_KEY, SteeringConfig, steering_config_from
from vllm_steer.engine.activation_capture import CAPTURE_KEY, parse_capture
from vllm_steer.errors import ConfigError, SpecError
from vllm_steer.integration import compat
from vllm_steer.integration.model_shape import model_shape_of
from vllm_steer.integration.patching import patch
from vllm_steer.integration.pipeline_stages import stage_split_problems
from vllm_steer.models.families import family_of
from vllm_steer.pack_registry import PackRegistry
from vllm_steer.spec import SPEC_KEY, ComposedSpec, SteeringSpec, parse_spec, respell

logger = init_logger("vllm.vllm_steer")

# id(ModelConfig) -> (ModelConfig, PackRegistry, SteeringConfig). The ModelConfig is kept so its id
# is not reused.
_REGISTRIES: dict[int, tuple[Any, PackRegistry, SteeringConfig]] = {}


def engine_steering(model_config: Any) -> tuple[PackRegistry, SteeringConfig] | None:
    hit = _REGISTRIES.get(id(model_config))
    return (hit[1], hit[2]) if hit is not None and hit[0] is model_config else None


def steering_engines() -> list[tuple[PackRegistry, SteeringConfig]]:
    """The steering engines this process has configured (one for ``vllm serve``)."""
    return [(registry, config) for _, registry, config in _REGISTRIES.values()]


def check_spec_against(params, registry: PackRegistry, config: SteeringConfig) -> None:
    """Check a SamplingParams' steering and capture requests against one engine's packs and config;
    raises VLLMValidationError (HTTP 400) naming the field."""
    try:
        spec = parse_spec(params.extra_args)
        capture = parse_capture(params.extra_args)
        if spec is not None:
            try:
                registry.resolve_all(spec)
                config.limits.check(spec)
            except SpecError as exc:
                raise respell(exc, params.extra_args) from None
        if capture is not None and not config.capture:
            raise SpecError("this engine was not started with steering.capture", field=CAPTURE_KEY)
    except SpecError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: SpecError) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older vLLM: a ValueError is already mapped to HTTP 400
        return exc
    return VLLMValidationError(str(exc), parameter=exc.field)


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _select_v1_model_runner() -> None:
    """The steering hooks live in the V1 model runner; Model Runner V2 (CUDA's default when Triton
    is present) is not supported yet. Select V1 through vLLM's own switch, before the engine config
    and its processes exist (they inherit the environment)."""
    value = os.environ.get(V2_RUNNER_ENV)
    if value is not None and value.strip().lower() in ("1", "true"):
        raise ConfigError(
            f"{V2_RUNNER_ENV}={value}: vllm-steer supports the V1 model runner only; unset it or set it to 0",
            field=V2_RUNNER_ENV,
        )
    if value is None:
        os.environ[V2_RUNNER_ENV] = "0"
        logger.info("vllm-steer: selecting the V1 model runner (%s=0); Model Runner V2 is not supported yet",
                    V2_RUNNER_ENV)


def unsupported_features(vllm_config) -> list[str]:
    """The parts of an engine configuration steering cannot honour, each with its reason (empty
    when it can). A steering engine with any of them is refused at start-up, never run unsteered."""
    parallel = vllm_config.parallel_config
    found = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        found.append("speculative decoding (speculative_config): draft and verified tokens share a step, "
                     "while steering slots and FASB's probe scores assume one sampled token per step")
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 0) > 1:
        found.append("dual-batch overlap / micro-batching (enable_dbo, ubatch_size): the per-token "
                     "steering slots cover a whole step, not a micro-batch")
    ray = compat.ray_data_parallel_problem(getattr(parallel, "data_parallel_backend", None))
    if ray is not None:
        found.append(f"the Ray data-parallel backend (data_parallel_backend='ray'): {ray}")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            found.append(f"context parallelism ({name} > 1): a request's tokens and heads are split "
                         "in ways the steering table does not follow")
    return found


def _log_packs(registry: PackRegistry, config: SteeringConfig) -> None:
    for line in registry.summary_lines():
        logger.info("vllm-steer: loaded steer pack %s", line)
    logger.info("vllm-steer: %d steer pack(s) loaded; per-request limits: %s", len(registry.packs),
                config.limits.model_dump())


def _create_engine_config(original, self, *args, **kwargs):
    if steering_config_from(getattr(self, "additional_config", None)) is not None:
        missing = compat.problems()
        if missing:
            raise ConfigError(compat.unsupported_message(missing), field="steering")
        _select_v1_model_runner()
    vllm_config = original(self, *args, **kwargs)
    config = steering_config_from(vllm_config.additional_config)
    if config is not None:
        refused = unsupported_features(vllm_config)
        if refused:
            raise ConfigError("vllm-steer cannot steer this engine configuration: " + "; ".join(refused),
                              field="steering")
        model_config = vllm_config.model_config
        if config.capture and not model_config.enforce_eager:
            raise ConfigError("steering.capture needs enforce_eager=True", field="steering.capture")
        if config.capture and vllm_config.cache_config.enable_prefix_caching:
            raise ConfigError(
                "steering.capture needs enable_prefix_caching=False (cached blocks are not recomputed)",
                field="steering.capture",
            )
        pp_size = getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)
        if config.capture and pp_size > 1:
            raise ConfigError("steering.capture needs pipeline_parallel_size=1 (captures are read from one "
                              "worker, which under pipeline parallelism holds only its stage's layers)",
                              field="steering.capture")
        shape = model_shape_of(model_config)
        family_of(shape.architecture)  # refuses an architecture vllm-steer does not steer, by name
        registry = PackRegistry.from_config(config, shape)
        split = stage_split_problems(registry, shape.num_layers, pp_size)
        if split:
            raise ConfigError("vllm-steer cannot steer this engine configuration: " + "; ".join(split),
                              field="steering.packs")
        _REGISTRIES[id(model_config)] = (model_config, registry, config)
        _log_packs(registry, config)
        vllm_config.additional_config = {
            **vllm_config.additional_config,
            ADDITIONAL_CONFIG_KEY: config.model_copy(update={"hooked_layers": registry.graph_key()}).model_dump(
                mode="json"),
        }
    return vllm_config


def _verify_args(original, self) -> None:
    spec_object = (self.extra_args or {}).get(SPEC_KEY)
    # the engine transport carries plain data only
    if isinstance(spec_object, (SteeringSpec, ComposedSpec)):
        self.extra_args = {**self.extra_args, SPEC_KEY: spec_object.model_dump(mode="json")}
    elif isinstance(spec_object, (list, tuple)):
        self.extra_args = {**self.extra_args, SPEC_KEY: [
            m.model_dump(mode="json") if isinstance(m, SteeringSpec) else m for m in spec_object]}
    original(self)
    try:
        parse_spec(self.extra_args)
        parse_capture(self.extra_args)
    except SpecError as exc:
        raise _validation_error(exc) from None


def _verify(original, self, model_config, *args, **kwargs) -> None:
    original(self, model_config, *args, **kwargs)
    try:
        spec = parse_spec(self.extra_args)
        capture = parse_capture(self.extra_args)
    except SpecError as exc:
        raise _validation_error(exc) from None
    if spec is None and capture is None:
        return
    engine = engine_steering(model_config)
    if engine is None:
        raise _validation_error(SpecError(
            "this request carries a steering spec but the engine was started without "
            "steering (pass additional_config={'steering': {...}} or --steering-plugin)",
            field="steering" if spec is not None else CAPTURE_KEY,
        ))
    check_spec_against(self, *engine)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams

    patch(EngineArgs, "create_engine_config")(_create_engine_config)
    patch(SamplingParams, "_verify_args")(_verify_args)
    patch(SamplingParams, "verify")(_verify)
