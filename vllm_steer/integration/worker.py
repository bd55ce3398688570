"""Worker-side hooks into vLLM's V1 model runner (GPUModelRunner, and CPUModelRunner on CPU).

* after ``load_model``: build this rank's SteeringTable and StepPlanner and hook the model;
* after ``_prepare_inputs`` (the batch order and positions of this step are final there):
  write the per-token slots of the step;
* ``_update_states``: forget requests the scheduler reports finished; apply FASB backtracks the
  scheduler sends as an attribute of SchedulerOutput (``FASB_UPDATES_ATTR``);
* ``sample_tokens``: turn the probe dots of monitored requests' newest tokens into mean P(desired)
  (all-reduced over tensor-parallel ranks) and return them as an attribute of the step's
  ModelRunnerOutput (``PROBE_SCORES_ATTR``), which reaches the scheduler with the sampled tokens;
* ``execute_model``, under pipeline parallelism: each stage hooks only its own layers; a stage that
  is not the last adds its probes' sigmoid sums to the partial sums it received and sends them on
  with its hidden states (``pipeline_stages.PROBE_SUMS_KEY``), so the last stage scores every probe.

Nothing is installed in a runner whose engine was started without ``additional_config["steering"]``.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_steer.config import steering_config_from
from vllm_steer.engine.activation_capture import ActivationCapturer, parse_capture
from vllm_steer.engine.condition_gate import ConditionGate
from vllm_steer.engine.l2s_predictor import L2SPredictor
from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.models.families import family_of
from vllm_steer.engine.step_planner import StepPlanner
from vllm_steer.integration.model_hooks import (
    install_capture_hooks,
    install_condition_hooks,
    install_hooks,
    install_l2s_hooks,
)
from vllm_steer.integration.model_shape import model_shape_of, rank_layout_of
from vllm_steer.integration.patching import patch
from vllm_steer.integration.pipeline_stages import PROBE_SUMS_KEY, this_stage, this_stage_layers
from vllm_steer.pack_registry import PackRegistry

logger = init_logger("vllm.vllm_steer")
PLANNER_ATTR = "_vllm_steer_planner"
PROBE_SCORES_ATTR = "vllm_steer_probe_scores"  # on ModelRunnerOutput: {req_id: mean P(desired)}
FASB_UPDATES_ATTR = "vllm_steer_fasb_updates"  # on SchedulerOutput: [FasbUpdate]
# on ModelRunnerOutput: {req_id: reason} for requests whose steering failed on this worker; the
# scheduler fails them (their client gets an error) and the engine serves on
FAILED_REQUESTS_ATTR = "vllm_steer_failed_requests"
CAPTURER_ATTR = "_vllm_steer_capturer"


def _attach(runner) -> None:
    config = steering_config_from(runner.vllm_config.additional_config)
    if config is None:
        return
    shape = model_shape_of(runner.model_config)
    family = family_of(shape.architecture)
    registry = PackRegistry.from_config(config, shape)
    hooked = json.loads(json.dumps(registry.graph_key()))  # as it came through additional_config
    if config.hooked_layers is not None and config.hooked_layers != hooked:
        raise RuntimeError(
            f"vllm-steer: the packs changed on disk between start-up and model load "
            f"(front-end saw {config.hooked_layers}, worker sees {hooked})"
        )
    layout = rank_layout_of(shape)
    stage_layers = this_stage_layers(shape.num_layers)
    probe_layers = registry.probe_layers
    table = SteeringTable(
        layout,
        head_layers=registry.head_layers,
        residual_layers=registry.residual_layers,
        max_num_tokens=runner.max_num_tokens,
        max_num_reqs=runner.max_num_reqs,
        device=runner.device,
        # a FASB member composed with others steers its backtrack through a second slot
        slots_per_request=2 if probe_layers else 1,
    )
    probes = (  # under pipeline parallelism, this stage's probe layers (maybe none) of all the packs'
        ProbeTable(layout, [l for l in probe_layers if l in stage_layers], runner.max_num_tokens, table.num_slots,
                   runner.device)
        if probe_layers else None
    )
    predictors = {
        pack.name: L2SPredictor(pack, table, runner.max_num_reqs, runner.device) for pack in registry.l2s_packs
    }
    for predictor in predictors.values():
        if not predictor.same_pass:
            logger.info(
                "vllm-steer: pack %s reads L2S at layer %d, after its steer layer %d: the vector exists only "
                "after the prefill, so it steers generated tokens only",
                predictor.pack_name, predictor.read_layer, predictor.steer_layer,
            )
    gates = {
        pack.name: ConditionGate(pack, table, runner.max_num_reqs, runner.max_num_tokens, runner.device)
        for pack in registry.condition_packs
    }
    install_l2s_hooks(runner.get_model(), list(predictors.values()), stage_layers, family)
    install_condition_hooks(runner.get_model(), list(gates.values()), stage_layers, family)
    handles = install_hooks(runner.get_model(), table, stage_layers, family, probes)
    expected = sum(l in stage_layers for l in table.head_layers) + sum(l in stage_layers for l in table.residual_layers)
    if len(handles) != expected:
        raise RuntimeError(f"vllm-steer: {len(handles)} steering hooks placed for layers {hooked} "
                           f"(this stage's layers {stage_layers.start}..{stage_layers.stop - 1})")
    planner = StepPlanner(table, registry, probes, predictors, gates)
    planner.hooked_layers = hooked
    setattr(runner, PLANNER_ATTR, planner)
    if config.capture:
        capturer = ActivationCapturer(shape.num_layers, layout.local_width, shape.hidden_size)
        install_capture_hooks(runner.get_model(), capturer, stage_layers, family)
        setattr(runner, CAPTURER_ATTR, capturer)
    planner.pipeline_stage = this_stage()
    logger.info(
        "vllm-steer: %d pack(s) %s; head steering at layers %s, residual at layers %s; %d slots%s",
        len(registry.packs), sorted(registry.packs), table.head_layers, table.residual_layers, table.num_slots,
        "" if planner.pipeline_stage[1] == 1 else
        f"; pipeline stage {planner.pipeline_stage[0]} hooks layers {stage_layers.start}..{stage_layers.stop - 1}",
    )


def _load_model(original, self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    _attach(self)
    return result


def _extra_args(runner, req_id: str):
    params = runner.requests[req_id].sampling_params
    return params.extra_args if params is not None else None


def _plan_step(runner, scheduler_output) -> None:
    planner: StepPlanner | None = getattr(runner, PLANNER_ATTR, None)
    if planner is None:
        return
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    req_ids = batch.req_ids[:num_reqs]
    scheduled = scheduler_output.num_scheduled_tokens
    num_scheduled = np.fromiter((scheduled[r] for r in req_ids), dtype=np.int64, count=num_reqs)
    num_computed = batch.num_computed_tokens_cpu[:num_reqs]
    num_prompt = batch.num_prompt_tokens[:num_reqs]
    num_tokens = batch.num_tokens_no_spec[:num_reqs]
    planner.plan_step(
        req_ids, num_scheduled, num_computed, num_prompt, lambda r: _extra_args(runner, r), num_tokens
    )

    capturer: ActivationCapturer | None = getattr(runner, CAPTURER_ATTR, None)
    if capturer is not None:
        first_rows = np.cumsum(num_scheduled) - num_scheduled
        wanted = []
        for i, req_id in enumerate(req_ids):
            spec = parse_capture(_extra_args(runner, req_id))
            if spec is not None:
                wanted.append((req_id, spec, int(num_prompt[i]), int(first_rows[i]), int(num_computed[i]),
                               int(num_scheduled[i])))
        capturer.plan_step(wanted, runner.device)


def _stage_probe_sums(planner: StepPlanner):
    """[M] float32 on the device: this step's monitored tokens' probe sigmoid sums over every head this
    pipeline stage holds (all-reduced over its tensor-parallel ranks), plus the partial sums the
    previous stage sent; None when nothing is monitored."""
    if not planner.monitored:
        return None
    probes = planner.probes
    sums = probes.sigmoid_sums(planner.monitored_rows, planner.monitored.by_pack)
    if probes.layout.tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        sums = tensor_model_parallel_all_reduce(sums)
    received = planner.received_probe_sums
    if received is not None:
        if received.shape != sums.shape:
            raise RuntimeError(f"vllm-steer: the previous pipeline stage sent probe sums for {received.shape[0]} "
                               f"tokens, this stage monitors {sums.shape[0]}")
        sums = sums + received
    elif planner.pipeline_stage[0] > 0:
        raise RuntimeError("vllm-steer: the previous pipeline stage sent no probe sums for this step's "
                           "monitored tokens")
    return sums


def _probe_scores(runner):
    """(planner, [M] float32 scores on the device) for this step's monitored tokens, or None."""
    planner: StepPlanner | None = getattr(runner, PLANNER_ATTR, None)
    if planner is None or not planner.monitored:
        return None
    sums = _stage_probe_sums(planner)
    return planner, sums / planner.probes.probe_counts(planner.monitored.by_pack, len(planner.monitored))


def _share_adaptive_scores(planner: StepPlanner, scores) -> None:
    """strength="paper" under pipeline parallelism: every stage plans the next step's strengths from
    this step's scores, which only the last stage has; it broadcasts them to the other stages (each
    calls this in the same step, ``scores`` None there) and they note them."""
    from vllm.distributed import get_pp_group

    group = get_pp_group()
    last = group.world_size - 1
    if scores is None:
        scores = torch.empty(len(planner.monitored), dtype=torch.float32, device=planner.probes.device)
    scores = group.broadcast(scores.contiguous(), src=last)
    if group.rank_in_group != last:
        planner.note_scores(planner.monitored.req_ids, planner.monitored.positions.tolist(), scores.cpu().tolist())


def _execute_model(original, self, scheduler_output, intermediate_tensors=None, *args, **kwargs):
    """Under pipeline parallelism: take the probe sums the previous stage sent out of the tensors
    vLLM copies into its own buffers (they have no slot for them), and, on a stage that is not the
    last, send this stage's running sums on with its hidden states."""
    planner: StepPlanner | None = getattr(self, PLANNER_ATTR, None)
    if planner is None or planner.pipeline_stage[1] == 1:
        return original(self, scheduler_output, intermediate_tensors, *args, **kwargs)
    planner.received_probe_sums = (
        intermediate_tensors.tensors.pop(PROBE_SUMS_KEY, None) if intermediate_tensors is not None else None)
    output = original(self, scheduler_output, intermediate_tensors, *args, **kwargs)
    tensors = getattr(output, "tensors", None)
    if isinstance(tensors, dict) and "hidden_states" in tensors:  # a stage that is not the last
        sums = _stage_probe_sums(planner)
        if sums is not None:
            tensors[PROBE_SUMS_KEY] = sums
    return output


def _sample_tokens(original, self, *args, **kwargs):
    planner: StepPlanner | None = getattr(self, PLANNER_ATTR, None)
    if planner is None:
        return original(self, *args, **kwargs)
    stage, num_stages = planner.pipeline_stage
    if stage < num_stages - 1:
        # The last stage scores and samples (this one sent its probe sums on) and reports the same
        # failures: they come from the same scheduler outputs on every stage.
        planner.take_failures()
        if planner.monitored and planner.has_adaptive_strength(planner.monitored.req_ids):
            _share_adaptive_scores(planner, None)
        return original(self, *args, **kwargs)
    scored = _probe_scores(self)
    req_ids, scores_cpu = [], None
    if scored is not None:
        _, scores = scored
        monitored = planner.monitored
        req_ids = monitored.req_ids
        if planner.has_adaptive_strength(req_ids):
            # strength="paper": this step's scores set the next step's strengths, on every rank.
            # The one host sync of the step that is not the scheduler's: the next step's
            # token scales are planned on the host from these scores.
            scores_cpu = scores.cpu()
            if num_stages > 1:
                _share_adaptive_scores(planner, scores)
            planner.note_scores(req_ids, monitored.positions.tolist(), scores_cpu.tolist())
        elif scores.is_cuda and getattr(self, "use_async_scheduling", False):
            # Enqueued before the runner's own device-to-host copy, which waits for this stream:
            # once its output is ready, so is this copy.
            scores_cpu = scores.to("cpu", non_blocking=True)
        else:
            scores_cpu = scores.cpu()  # the scores must reach the scheduler with this step
    failures = planner.take_failures()
    output = original(self, *args, **kwargs)
    if scores_cpu is None and not failures:
        return output

    def attach(result):
        if scores_cpu is not None:
            setattr(result, PROBE_SCORES_ATTR, dict(zip(req_ids, scores_cpu.tolist())))
        if failures:
            setattr(result, FAILED_REQUESTS_ATTR, failures)
        return result

    get_output = getattr(output, "get_output", None)
    if get_output is not None and not hasattr(output, "sampled_token_ids"):
        @functools.wraps(get_output)
        def get_output_with_steering():
            return attach(get_output())

        output.get_output = get_output_with_steering
    elif output is not None:
        attach(output)
    return output


COLLECT_CAPTURES_RPC = "vllm_steer_collect_captures"
STATS_RPC = "vllm_steer_stats"


def steering_stats(worker) -> dict:
    """A worker method (``LLM.collective_rpc(STATS_RPC)``): counters of this rank's planner."""
    planner: StepPlanner | None = getattr(worker.model_runner, PLANNER_ATTR, None)
    if planner is None:
        return {}
    return {
        "hooked_layers": planner.hooked_layers,
        "l2s_predictions": planner.l2s_predictions,
        "l2s_repeats": planner.l2s_repeats,
        "conditions_decided": planner.conditions_decided,
        "conditions_met": planner.conditions_met,
        "slots_in_use": planner.num_steered_requests,
        "slots_total": planner.table.max_num_reqs,  # requests that can hold a slot at once
    }


def collect_captures(worker, keys: list[str]) -> dict:
    """A worker method (``LLM.collective_rpc(COLLECT_CAPTURES_RPC)``): pop the captures for ``keys``."""
    capturer = getattr(worker.model_runner, CAPTURER_ATTR, None)
    if capturer is None:
        raise RuntimeError("this engine was not started with steering.capture")
    # RPC results travel as msgpack: send float32 tensors as (shape, raw bytes).
    return {
        key: {name: (list(t.shape), t.contiguous().numpy().tobytes()) for name, t in tensors.items()}
        for key, tensors in capturer.collect(keys).items()
    }


def _prepare_inputs(original, self, scheduler_output, *args, **kwargs):
    result = original(self, scheduler_output, *args, **kwargs)
    _plan_step(self, scheduler_output)
    return result


def _trim_rolled_back_outputs(runner, scheduler_output) -> None:
    """A stage that is not the last keeps its requests' tokens from the scheduler's ``new_token_ids``
    and never shortens them; the last stage trims to ``num_output_tokens``. A FASB backtrack rolled
    back in place reaches the workers as a resumed request with fewer output tokens: trim them here
    too, or this stage would feed the retracted tokens back in as the regenerated ones' inputs."""
    cached = scheduler_output.scheduled_cached_reqs
    if not cached.resumed_req_ids:
        return
    for i, req_id in enumerate(cached.req_ids):
        state = runner.requests.get(req_id)
        if req_id in cached.resumed_req_ids and state is not None:
            del state.output_token_ids[cached.num_output_tokens[i]:]


def _update_states(original, self, scheduler_output, *args, **kwargs):
    planner = getattr(self, PLANNER_ATTR, None)
    if planner is not None and planner.pipeline_stage[0] < planner.pipeline_stage[1] - 1:
        _trim_rolled_back_outputs(self, scheduler_output)
    updates = getattr(scheduler_output, FASB_UPDATES_ATTR, None)
    if planner is not None and updates:
        for update in updates:
            try:
                planner.apply_update(update, lambda r: _extra_args(self, r))
            except Exception as exc:  # fails this request only
                planner.record_failure(update.req_id, exc)
    if planner is not None and scheduler_output.finished_req_ids:
        planner.forget(scheduler_output.finished_req_ids)
        capturer = getattr(self, CAPTURER_ATTR, None)
        if capturer is not None:
            capturer.finish(scheduler_output.finished_req_ids)
    return original(self, scheduler_output, *args, **kwargs)


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, COLLECT_CAPTURES_RPC, collect_captures)
    setattr(WorkerBase, STATS_RPC, steering_stats)
    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)  # it overrides load_model
    except ImportError:
        pass
    for runner in runners:
        if "load_model" in runner.__dict__:
            patch(runner, "load_model")(_load_model)
    patch(GPUModelRunner, "sample_tokens")(_sample_tokens)
    patch(GPUModelRunner, "execute_model")(_execute_model)
    patch(GPUModelRunner, "_prepare_inputs")(_prepare_inputs)
    patch(GPUModelRunner, "_update_states")(_update_states)
