"""Scheduler hooks for FASB (EngineCore process): backtracking by preemption and the commit horizon.

Patched onto vLLM's V1 ``Scheduler`` (``AsyncScheduler`` inherits them); inert for engines started
without ``additional_config["steering"]`` and for requests that are not FASB.

* ``add_request``: start tracking monitored requests.
* ``_update_request_with_output``: after vLLM appends a sampled token (and ``check_stop`` ran),
  check the step's probe score; a firing check vetoes the stop, so a request can still backtrack on
  the step where it would have finished.
* ``update_from_output``: read the workers' probe scores (``PROBE_SCORES_ATTR`` on the
  ModelRunnerOutput); after vLLM processed the step, backtrack the fired requests by preemption,
  then hold back every monitored request's tokens inside the commit horizon.
* ``schedule``: hand the backtracks to the workers as ``FASB_UPDATES_ATTR`` on the SchedulerOutput.
* ``_free_request``: forget finished and aborted requests.

A backtrack drops the last generated tokens from the request in place, forgets the block hashes
from the first steered position on (those blocks are recomputed under steering and re-hashed with a
salted key, see prefix_cache.py), and preempts the request with its in-flight output dropped; it
resumes from a prefix-cache hit (or a full recompute with prefix caching off) and regenerates.
Under async scheduling the request also leaves ``prev_step_scheduled_req_ids`` so the workers get
its full token list again.
"""

from __future__ import annotations

import functools
import time

import numpy as np
from vllm.logger import init_logger

from vllm_steer.config import steering_config_from
from vllm_steer.engine.fasb import Backtrack, FasbController
from vllm_steer.errors import SteeringError
from vllm_steer.integration.prefix_cache import set_steering_cache_key
from vllm_steer.integration.worker import FASB_UPDATES_ATTR, PROBE_SCORES_ATTR
from vllm_steer.spec import parse_spec

logger = init_logger("vllm_steer")
_CONTROLLER_ATTR = "_vllm_steer_fasb"
_CARRIED_FIELDS = ("prefill_stats", "new_prompt_logprobs_tensors", "prompt_token_id_logprobs")


def controller_of(scheduler) -> FasbController | None:
    """The scheduler's FASB controller; None when the engine runs without steering."""
    ctl = scheduler.__dict__.get(_CONTROLLER_ATTR, False)
    if ctl is False:
        enabled = steering_config_from(scheduler.vllm_config.additional_config) is not None
        ctl = FasbController() if enabled else None
        scheduler.__dict__[_CONTROLLER_ATTR] = ctl
        scheduler.__dict__["_vllm_steer_scores"] = {}
        scheduler.__dict__["_vllm_steer_fired"] = []
        scheduler.__dict__["_vllm_steer_updates"] = []
        scheduler.__dict__["_vllm_steer_requests_by_method"] = {}
    return ctl


def scheduler_stats(scheduler) -> dict:
    """Counters since start-up: steered requests by method, FASB probe checks, backtracks and
    recomputed tokens."""
    ctl = controller_of(scheduler)
    if ctl is None:
        return {}
    return {
        "requests_by_method": dict(scheduler.__dict__["_vllm_steer_requests_by_method"]),
        "probe_checks": ctl.num_checks,
        "backtracks": ctl.num_backtracks,
        "recomputed_tokens": ctl.num_recomputed_tokens,
    }


def _backtrack(scheduler, request, backtrack: Backtrack) -> None:
    """Drop the tokens ``backtrack`` does not keep and send the request back to be recomputed.

    A running request is preempted here. A request already preempted (KV pressure, under async
    scheduling: its in-flight output arrived after the preemption) is only truncated; it resumes by
    itself and recomputes from the kept tokens like any preempted request."""
    from vllm.v1.request import RequestStatus

    assert request.status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED), request.status
    num_drop = request.num_output_tokens - backtrack.keep
    if num_drop > 0:
        del request._output_token_ids[-num_drop:]
        del request._all_token_ids[-num_drop:]
        structured = getattr(request, "structured_output_request", None)
        grammar = getattr(structured, "grammar", None) if structured is not None else None
        if grammar is not None:
            grammar.rollback(num_drop)
    update = backtrack.update
    spec = scheduler.__dict__[_CONTROLLER_ATTR].requests[request.request_id].spec
    set_steering_cache_key(request, update.cache_key(spec))
    del request.block_hashes[update.steer_from // scheduler.hash_block_size :]
    request.update_block_hashes()
    if request.status == RequestStatus.RUNNING:
        scheduler.running.remove(request)
        scheduler._preempt_request(request, time.monotonic(), drop_stale_output=True)
        scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
    scheduler.__dict__["_vllm_steer_updates"].append(update)
    logger.debug(
        "vllm-steer: FASB backtrack of %s at score %.4f: kept %d generated tokens, steering from "
        "position %d at strength %.4f", request.request_id, backtrack.score, backtrack.keep,
        update.steer_from, update.strength,
    )


def _logprob_rows(new_logprobs) -> list:
    if new_logprobs is None:
        return []
    ids, lps, ranks = new_logprobs.logprob_token_ids, new_logprobs.logprobs, new_logprobs.sampled_token_ranks
    return [(ids[i], lps[i], ranks[i]) for i in range(len(ranks))]


def _stack_logprobs(rows: list, template):
    ids = np.stack([r[0] for r in rows])
    lps = np.stack([r[1] for r in rows])
    ranks = np.stack([r[2] for r in rows])
    return type(template)(ids, lps, ranks, None)


def _apply_commit_horizon(scheduler, ctl: FasbController, engine_core_outputs: dict) -> None:
    for eco in engine_core_outputs.values():
        if not eco.outputs:
            continue
        kept = []
        for out in eco.outputs:
            state = ctl.requests.get(out.request_id)
            if state is None:
                kept.append(out)
                continue
            state.held_tokens.extend(out.new_token_ids)
            rows = _logprob_rows(out.new_logprobs)
            if out.new_logprobs is not None:
                state.carried["logprobs_template"] = out.new_logprobs
            state.held_logprobs.extend(rows)
            request = scheduler.requests.get(out.request_id)
            if request is not None and not request.is_finished():
                state.truncate(request.num_output_tokens)  # a backtrack this step drops held tokens
            finished = out.finish_reason is not None
            n = state.releasable(finished)
            if n == 0 and not finished:
                for name in _CARRIED_FIELDS:
                    value = getattr(out, name)
                    if value is not None and name not in state.carried:
                        state.carried[name] = value
                if out.events:
                    state.carried.setdefault("events", []).extend(out.events)
                continue
            out.new_token_ids = state.held_tokens[:n]
            del state.held_tokens[:n]
            template = state.carried.get("logprobs_template")
            if template is not None and state.held_logprobs:
                out.new_logprobs = _stack_logprobs(state.held_logprobs[:n], template)
                del state.held_logprobs[:n]
            else:
                out.new_logprobs = None
            for name in _CARRIED_FIELDS:
                if name in state.carried and getattr(out, name) is None:
                    setattr(out, name, state.carried.pop(name))
            if "events" in state.carried:
                out.events = state.carried.pop("events") + list(out.events or [])
            state.released += n
            kept.append(out)
        eco.outputs = kept


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    if getattr(Scheduler.update_from_output, "_vllm_steer", False):
        return

    original_add = Scheduler.add_request

    @functools.wraps(original_add)
    def add_request(self, request) -> None:
        original_add(self, request)
        ctl = controller_of(self)
        if ctl is None or request.sampling_params is None:
            return
        try:
            spec = parse_spec(request.sampling_params.extra_args)
        except SteeringError:  # refused by the front-end already; the worker runs it unsteered
            return
        if spec is not None and spec.active:
            by_method = self.__dict__["_vllm_steer_requests_by_method"]
            by_method[spec.method] = by_method.get(spec.method, 0) + 1
        if spec is not None and spec.monitored:
            ctl.track(request.request_id, spec, request.num_prompt_tokens)

    original_update_request = Scheduler._update_request_with_output

    @functools.wraps(original_update_request)
    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        ctl = controller_of(self)
        state = ctl.requests.get(request.request_id) if ctl is not None else None
        if state is None:
            return original_update_request(self, request, new_token_ids, *args, **kwargs)
        # A preempted request gets output here only under async scheduling: the step in flight
        # when KV pressure preempted it is delivered afterwards ("stale" output). It is checked
        # like any other step, or FASB would skip the check that step carries.
        status_before = request.status
        new_token_ids, stopped = original_update_request(self, request, new_token_ids, *args, **kwargs)
        score = self.__dict__["_vllm_steer_scores"].get(request.request_id)
        if (score is None or not new_token_ids
                or status_before not in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)):
            return new_token_ids, stopped
        backtrack = ctl.check(request.request_id, score, request.num_output_tokens, final=stopped)
        if backtrack is not None:
            if stopped:  # veto the stop: the request regenerates instead
                request.status = status_before
                request.stop_reason = None
                stopped = False
            self.__dict__["_vllm_steer_fired"].append((request, backtrack))
        return new_token_ids, stopped

    original_update = Scheduler.update_from_output

    @functools.wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output):
        ctl = controller_of(self)
        if ctl is None:
            return original_update(self, scheduler_output, model_runner_output)
        self.__dict__["_vllm_steer_scores"] = getattr(model_runner_output, PROBE_SCORES_ATTR, None) or {}
        fired = self.__dict__["_vllm_steer_fired"] = []
        try:
            outputs = original_update(self, scheduler_output, model_runner_output)
        finally:
            self.__dict__["_vllm_steer_scores"] = {}
        for request, backtrack in fired:
            if (request.status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)
                    and request.request_id in self.requests):
                _backtrack(self, request, backtrack)
        fired.clear()
        if ctl.requests:
            _apply_commit_horizon(self, ctl, outputs)
            for req_id in [r for r, s in ctl.requests.items() if s.freed]:
                ctl.forget(req_id)
        return outputs

    update_from_output._vllm_steer = True
    Scheduler.update_from_output = update_from_output
    Scheduler._update_request_with_output = _update_request_with_output
    Scheduler.add_request = add_request

    original_schedule = Scheduler.schedule

    @functools.wraps(original_schedule)
    def schedule(self, *args, **kwargs):
        scheduler_output = original_schedule(self, *args, **kwargs)
        if controller_of(self) is not None and self.__dict__["_vllm_steer_updates"]:
            setattr(scheduler_output, FASB_UPDATES_ATTR, self.__dict__["_vllm_steer_updates"])
            self.__dict__["_vllm_steer_updates"] = []
        return scheduler_output

    Scheduler.schedule = schedule

    original_free = Scheduler._free_request

    @functools.wraps(original_free)
    def _free_request(self, request, *args, **kwargs):
        ctl = controller_of(self)
        if ctl is not None and request.request_id in ctl.requests:
            ctl.requests[request.request_id].freed = True
        return original_free(self, request, *args, **kwargs)

    Scheduler._free_request = _free_request
