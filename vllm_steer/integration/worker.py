"""Worker-side hooks into vLLM's V1 model runner (GPUModelRunner, and CPUModelRunner on CPU).

* after ``load_model``: build this rank's SteeringTable and StepPlanner and hook the model;
* after ``_prepare_inputs`` (the batch order and positions of this step are final there):
  write the per-token slots of the step;
* ``_update_states``: forget requests the scheduler reports finished.

Nothing is installed in a runner whose engine was started without ``additional_config["steering"]``.
"""

from __future__ import annotations

import functools
from vllm.logger import init_logger

from vllm_steer.config import steering_config_from
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.engine.step_planner import StepPlanner
from vllm_steer.integration.model_hooks import install_hooks
from vllm_steer.integration.model_shape import model_shape_of, rank_layout_of
from vllm_steer.pack_registry import PackRegistry

logger = init_logger("vllm_steer")
PLANNER_ATTR = "_vllm_steer_planner"


def _attach(runner) -> None:
    config = steering_config_from(runner.vllm_config.additional_config)
    if config is None:
        return
    shape = model_shape_of(runner.model_config)
    registry = PackRegistry.from_config(config, shape)
    hooked = {"head": registry.head_layers, "residual": registry.residual_layers}
    if config.hooked_layers is not None and config.hooked_layers != hooked:
        raise RuntimeError(
            f"vllm-steer: the packs changed on disk between start-up and model load "
            f"(front-end saw layers {config.hooked_layers}, worker sees {hooked})"
        )
    layout = rank_layout_of(shape)
    table = SteeringTable(
        layout,
        head_layers=registry.head_layers,
        residual_layers=registry.residual_layers,
        max_num_tokens=runner.max_num_tokens,
        max_num_reqs=runner.max_num_reqs,
        device=runner.device,
    )
    install_hooks(runner.get_model(), table, shape.num_layers)
    setattr(runner, PLANNER_ATTR, StepPlanner(table, registry))
    logger.info(
        "vllm-steer: %d pack(s) %s; head steering at layers %s, residual at layers %s; %d slots",
        len(registry.packs), sorted(registry.packs), table.head_layers, table.residual_layers, table.num_slots,
    )


def _wrap_load_model(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_vllm_steer", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _attach(self)
        return result

    load_model._vllm_steer = True
    cls.load_model = load_model


def _plan_step(runner, scheduler_output) -> None:
    planner: StepPlanner | None = getattr(runner, PLANNER_ATTR, None)
    if planner is None:
        return
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    req_ids = batch.req_ids[:num_reqs]
    scheduled = scheduler_output.num_scheduled_tokens
    requests = runner.requests
    import numpy as np

    planner.plan_step(
        req_ids,
        np.fromiter((scheduled[r] for r in req_ids), dtype=np.int64, count=num_reqs),
        batch.num_computed_tokens_cpu[:num_reqs],
        batch.num_prompt_tokens[:num_reqs],
        lambda req_id: requests[req_id].sampling_params.extra_args
        if requests[req_id].sampling_params is not None
        else None,
    )


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_load_model(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        CPUModelRunner = None
    if CPUModelRunner is not None:
        _wrap_load_model(CPUModelRunner)

    if getattr(GPUModelRunner._prepare_inputs, "_vllm_steer", False):
        return
    original_prepare = GPUModelRunner._prepare_inputs

    @functools.wraps(original_prepare)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original_prepare(self, scheduler_output, *args, **kwargs)
        _plan_step(self, scheduler_output)
        return result

    _prepare_inputs._vllm_steer = True
    GPUModelRunner._prepare_inputs = _prepare_inputs

    original_update = GPUModelRunner._update_states

    @functools.wraps(original_update)
    def _update_states(self, scheduler_output, *args, **kwargs):
        planner = getattr(self, PLANNER_ATTR, None)
        if planner is not None and scheduler_output.finished_req_ids:
            planner.forget(scheduler_output.finished_req_ids)
        return original_update(self, scheduler_output, *args, **kwargs)

    GPUModelRunner._update_states = _update_states
