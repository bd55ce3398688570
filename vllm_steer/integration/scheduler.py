"""Scheduler hooks for FASB (EngineCore process): backtracking in place and the commit horizon.

Patched onto vLLM's V1 ``Scheduler`` (``AsyncScheduler`` inherits them); inert for engines started
without ``additional_config["steering"]`` and for requests that are not FASB.

* ``add_request``: start tracking monitored requests.
* ``_update_request_with_output``: after vLLM appends a sampled token (and ``check_stop`` ran),
  check the step's probe score; a firing check vetoes the stop, so a request can still backtrack on
  the step where it would have finished.
* ``update_from_output``: read the workers' probe scores (``PROBE_SCORES_ATTR`` on the
  ModelRunnerOutput); after vLLM processed the step, backtrack the fired requests, then hold back
  every monitored request's tokens inside the commit horizon.
* ``schedule``: hand the backtracks to the workers as ``FASB_UPDATES_ATTR`` on the SchedulerOutput,
  and send each request rolled back in place to the workers as "resumed" (below).
* ``_free_request``: forget finished and aborted requests.

Defence in depth: an unexpected exception in this steering code for one request (or one a worker
reports for a request, ``FAILED_REQUESTS_ATTR`` on the ModelRunnerOutput) fails that request only:
it is finished with ``FINISHED_ERROR`` at the end of the step (its KV blocks freed, the workers told
to drop it, its tokens of that step withheld), its client gets an error, and the engine serves on.

The plugin's per-engine state lives in one ``SchedulerSteering`` object on the scheduler.

A backtrack drops the last generated tokens from the request in place and forgets the block hashes
from the first steered position ``steer_from`` on (those blocks are recomputed under steering and
re-hashed with a salted key, see prefix_cache.py). Then, in place (the request keeps running):
its KV blocks past ``steer_from`` are released and the block holding it is made private and
hash-free (kv_rollback.py: kept, copied, or evicted from the prefix cache), ``num_computed_tokens``
goes back to ``steer_from``, the output of a step still in flight (async scheduling) is dropped, and
the request leaves ``prev_step_scheduled_req_ids``. The next ``schedule`` sends it to the workers as
a resumed request (``resumed_req_ids``, its full block list and token list), so the runner rebuilds
its batch row from the kept tokens, exactly as for a request resumed after a preemption, and the
step recomputes only position ``steer_from`` (steered) and decodes on: no re-prefill, with prefix
caching on or off.

The fallback is the old path, preemption with the in-flight output dropped (the request resumes
from a prefix-cache hit, or a full recompute with prefix caching off): for a request already
preempted by KV pressure (under async scheduling its in-flight output arrives after the
preemption), with a KV connector, a KV cache group other than full attention, multimodal input
after ``steer_from``, or a shared block to copy and no free block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from vllm.logger import init_logger

from vllm_steer.config import steering_config_from
from vllm_steer.engine.fasb import Backtrack, FasbController, FasbUpdate
from vllm_steer.integration import kv_rollback
from vllm_steer.integration.compat import discard_in_flight, preempt_dropping_in_flight
from vllm_steer.integration.patching import patch
from vllm_steer.integration.prefix_cache import set_steering_cache_key
from vllm_steer.integration.worker import FAILED_REQUESTS_ATTR, FASB_UPDATES_ATTR, PROBE_SCORES_ATTR
from vllm_steer.spec import parse_spec

logger = init_logger("vllm.vllm_steer")
_STATE_ATTR = "_vllm_steer"
_CARRIED_FIELDS = ("prefill_stats", "new_prompt_logprobs_tensors", "prompt_token_id_logprobs")


@dataclass
class SchedulerSteering:
    """The plugin's state in one engine's scheduler."""

    fasb: FasbController = field(default_factory=FasbController)
    scores: dict[str, float] = field(default_factory=dict)  # the step being processed: req_id -> p
    fired: list[tuple[object, Backtrack]] = field(default_factory=list)  # (vLLM Request, backtrack)
    updates: list[FasbUpdate] = field(default_factory=list)  # for the workers, with the next step
    requests_by_method: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # req_id -> client index, to fail this step
    num_failed: int = 0
    resync: set[str] = field(default_factory=set)  # rolled back in place: next scheduled as resumed
    after_backtrack: set[str] = field(default_factory=set)  # backtracked, not scheduled since
    num_in_place: int = 0
    num_by_preemption: int = 0
    num_kv_copies: int = 0
    max_tokens_after_backtrack: int = 0  # most tokens scheduled for a request in its first step after one
    # live packs removed while requests still named them: name -> removes it from the workers
    retiring: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def fail(self, request, where: str, exc: BaseException) -> None:
        """Fail ``request`` at the end of this step (see the module docstring)."""
        reason = f"{where}: {type(exc).__name__}: {exc}"
        logger.error("vllm-steer: request %s failed in steering code (%s); the engine serves on",
                     request.request_id, reason, exc_info=exc)
        self.failures.setdefault(request.request_id, request.client_index)


def steering_state(scheduler) -> SchedulerSteering | None:
    """The scheduler's steering state; None when the engine runs without steering."""
    state = scheduler.__dict__.get(_STATE_ATTR, False)
    if state is False:
        enabled = steering_config_from(scheduler.vllm_config.additional_config) is not None
        state = SchedulerSteering() if enabled else None
        scheduler.__dict__[_STATE_ATTR] = state
    return state


def scheduler_stats(scheduler) -> dict:
    """Counters since start-up: steered requests by method, FASB probe checks, backtracks,
    recomputed tokens (in all and per finished FASB request), how backtracks were done (in place, by
    preemption; KV blocks copied; the most tokens a request was scheduled in its first step after a
    backtrack: 1 when in place) and requests failed by steering code."""
    state = steering_state(scheduler)
    if state is None:
        return {}
    ctl = state.fasb
    return {
        "requests_by_method": dict(state.requests_by_method),
        "probe_checks": ctl.num_checks,
        "backtracks": ctl.num_backtracks,
        "recomputed_tokens": ctl.num_recomputed_tokens,
        "recomputed_tokens_per_request": ctl.recomputed_per_request.snapshot(),
        "failed_requests": state.num_failed,
        "backtracks_in_place": state.num_in_place,
        "backtracks_by_preemption": state.num_by_preemption,
        "kv_copies": state.num_kv_copies,
        "max_tokens_scheduled_after_backtrack": state.max_tokens_after_backtrack,
    }


def _backtrack(scheduler, state: SchedulerSteering, request, backtrack: Backtrack) -> None:
    """Drop the tokens ``backtrack`` does not keep and recompute from ``steer_from``.

    A running request is rolled back in place (see the module docstring), or preempted where that
    cannot be done. A request already preempted (KV pressure, under async scheduling: its in-flight
    output arrived after the preemption) is only truncated; it resumes by itself and recomputes from
    the kept tokens like any preempted request."""
    from vllm.v1.request import RequestStatus

    if request.status not in (RequestStatus.RUNNING, RequestStatus.PREEMPTED):
        raise AssertionError(f"backtrack of a request in state {request.status}")
    update = backtrack.update
    rollback = kv_rollback.plan(scheduler, request, update.steer_from)  # before anything changes
    num_drop = request.num_output_tokens - backtrack.keep
    if num_drop > 0:
        del request._output_token_ids[-num_drop:]
        del request._all_token_ids[-num_drop:]
        structured = getattr(request, "structured_output_request", None)
        grammar = getattr(structured, "grammar", None) if structured is not None else None
        if grammar is not None:
            grammar.rollback(num_drop)
    tracked = state.fasb.requests[request.request_id]
    set_steering_cache_key(request, update.cache_key(tracked.request_spec or tracked.spec, request.num_prompt_tokens))
    del request.block_hashes[update.steer_from // scheduler.hash_block_size :]
    request.update_block_hashes()
    if isinstance(rollback, kv_rollback.RollbackPlan):
        kv_rollback.apply(request, rollback)
        request.num_computed_tokens = update.steer_from
        if request.spec_token_ids:
            request.spec_token_ids = []
        discard_in_flight(request)
        scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
        state.resync.add(request.request_id)
        state.num_in_place += 1
        state.num_kv_copies += rollback.num_copies
    elif request.status == RequestStatus.RUNNING:
        logger.debug("vllm-steer: FASB backtrack of %s by preemption: %s", request.request_id, rollback)
        scheduler.running.remove(request)
        preempt_dropping_in_flight(scheduler, request, time.monotonic())
        scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
        state.num_by_preemption += 1
    else:  # already preempted (KV pressure): it resumes through the waiting queue all the same
        state.num_by_preemption += 1
    state.after_backtrack.add(request.request_id)
    state.updates.append(update)
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


def _hold_back(scheduler, ctl: FasbController, out) -> bool:
    """The commit horizon for one monitored request's output: hold its tokens until no later check
    can retract them. Returns whether ``out`` goes to the client this step."""
    state = ctl.requests[out.request_id]
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
            value = getattr(out, name, None)
            if value is not None and name not in state.carried:
                state.carried[name] = value
        if out.events:
            state.carried.setdefault("events", []).extend(out.events)
        return False
    out.new_token_ids = state.held_tokens[:n]
    del state.held_tokens[:n]
    template = state.carried.get("logprobs_template")
    if template is not None and state.held_logprobs:
        out.new_logprobs = _stack_logprobs(state.held_logprobs[:n], template)
        del state.held_logprobs[:n]
    else:
        out.new_logprobs = None
    for name in _CARRIED_FIELDS:
        if name in state.carried and getattr(out, name, None) is None:
            setattr(out, name, state.carried.pop(name))
    if "events" in state.carried:
        out.events = state.carried.pop("events") + list(out.events or [])
    state.released += n
    return True


def _apply_commit_horizon(scheduler, state: SchedulerSteering, engine_core_outputs: dict) -> None:
    ctl = state.fasb
    for eco in engine_core_outputs.values():
        if not eco.outputs:
            continue
        kept = []
        for out in eco.outputs:
            if out.request_id not in ctl.requests:
                kept.append(out)
                continue
            try:
                if _hold_back(scheduler, ctl, out):
                    kept.append(out)
            except Exception as exc:
                request = scheduler.requests.get(out.request_id)
                if request is not None:
                    state.fail(request, "FASB commit horizon", exc)
        eco.outputs = kept


def _finish_failed(scheduler, state: SchedulerSteering) -> None:
    from vllm.v1.request import RequestStatus

    if state.failures:
        scheduler.finish_requests(list(state.failures), RequestStatus.FINISHED_ERROR)


def _report_failed(scheduler, state: SchedulerSteering, engine_core_outputs: dict) -> None:
    """Finish the failed requests (frees their KV; the workers hear of it with the next step),
    withhold their outputs of this step and send each client an error for its request."""
    if not state.failures:
        return
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    _finish_failed(scheduler, state)
    for eco in engine_core_outputs.values():
        if eco.outputs:
            eco.outputs = [out for out in eco.outputs if out.request_id not in state.failures]
    for req_id, client_index in state.failures.items():
        eco = engine_core_outputs.get(client_index)
        if eco is None:
            eco = engine_core_outputs[client_index] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(request_id=req_id, new_token_ids=[], finish_reason=FinishReason.ERROR))
        state.fasb.forget(req_id)
        state.num_failed += 1
    state.failures.clear()


def _add_request(original, self, request) -> None:
    state = steering_state(self)
    spec = error = None
    if state is not None and request.sampling_params is not None:
        try:
            spec = parse_spec(request.sampling_params.extra_args)
        except Exception as exc:
            error = exc
        if spec is not None and spec.gate is not None:
            # CAST reads every prompt token at the condition layer: a prefix-cache hit would skip some
            request.skip_reading_prefix_cache = True
    original(self, request)
    if state is None or request.sampling_params is None:
        return
    try:  # the front-end refuses a bad spec; one that got here anyway fails its request
        if error is not None:
            raise error
        if spec is not None and spec.active:
            by_method = state.requests_by_method
            by_method[spec.method] = by_method.get(spec.method, 0) + 1
        if spec is not None and spec.monitored:
            state.fasb.track(request.request_id, spec, request.num_prompt_tokens)
    except Exception as exc:
        state.fail(request, "admission", exc)


def _update_request_with_output(original, self, request, new_token_ids, *args, **kwargs):
    from vllm.v1.request import RequestStatus

    state = steering_state(self)
    if state is None or request.request_id not in state.fasb.requests:
        return original(self, request, new_token_ids, *args, **kwargs)
    # A preempted request gets output here only under async scheduling: the step in flight
    # when KV pressure preempted it is delivered afterwards ("stale" output). It is checked
    # like any other step, or FASB would skip the check that step carries.
    status_before = request.status
    new_token_ids, stopped = original(self, request, new_token_ids, *args, **kwargs)
    score = state.scores.get(request.request_id)
    if (score is None or not new_token_ids
            or status_before not in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)):
        return new_token_ids, stopped
    try:
        backtrack = state.fasb.check(request.request_id, score, request.num_output_tokens, final=stopped)
    except Exception as exc:
        state.fail(request, "FASB check", exc)
        return new_token_ids, stopped
    if backtrack is not None:
        if stopped:  # veto the stop: the request regenerates instead
            request.status = status_before
            request.stop_reason = None
            stopped = False
        state.fired.append((request, backtrack))
    return new_token_ids, stopped


def _update_from_output(original, self, scheduler_output, model_runner_output):
    from vllm.v1.request import RequestStatus

    state = steering_state(self)
    if state is None:
        return original(self, scheduler_output, model_runner_output)
    for req_id, reason in (getattr(model_runner_output, FAILED_REQUESTS_ATTR, None) or {}).items():
        request = self.requests.get(req_id)
        if request is not None:
            state.fail(request, "worker", RuntimeError(reason))
    _finish_failed(self, state)  # before vLLM reads this step's tokens: theirs are dropped
    state.scores = getattr(model_runner_output, PROBE_SCORES_ATTR, None) or {}
    state.fired = []
    try:
        outputs = original(self, scheduler_output, model_runner_output)
    finally:
        state.scores = {}
    for request, backtrack in state.fired:
        if (request.status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)
                and request.request_id in self.requests and request.request_id not in state.failures):
            try:
                _backtrack(self, state, request, backtrack)
            except Exception as exc:
                state.fail(request, "FASB backtrack", exc)
    state.fired = []
    if state.fasb.requests:
        _apply_commit_horizon(self, state, outputs)
    _report_failed(self, state, outputs)
    if state.fasb.requests:
        for req_id in [r for r, s in state.fasb.requests.items() if s.freed]:
            state.fasb.forget(req_id)
    if state.retiring:
        from vllm_steer.integration.live_packs import retire_unused

        retire_unused(self, state)
    return outputs


def _resync(scheduler, state: SchedulerSteering, scheduler_output) -> None:
    """Send the requests rolled back in place to the workers as resumed: the runner drops the
    request's batch row (and the token sampled for it in flight), trims its output tokens to the
    kept ones and rebuilds the row from its full block list. A request not scheduled this step
    keeps its mark: the runner drops its row anyway and needs the full block list when it is."""
    cached = scheduler_output.scheduled_cached_reqs
    index = {rid: i for i, rid in enumerate(cached.req_ids)}
    for rid in list(state.resync):
        i = index.get(rid)
        if i is None:
            continue
        cached.resumed_req_ids.add(rid)
        cached.new_block_ids[i] = scheduler.kv_cache_manager.get_block_ids(rid)
        state.resync.discard(rid)


def _schedule(original, self, *args, **kwargs):
    scheduler_output = original(self, *args, **kwargs)
    state = steering_state(self)
    if state is None:
        return scheduler_output
    if state.after_backtrack:
        scheduled = scheduler_output.num_scheduled_tokens
        for rid in [r for r in state.after_backtrack if r in scheduled]:
            state.max_tokens_after_backtrack = max(state.max_tokens_after_backtrack, scheduled[rid])
            state.after_backtrack.discard(rid)
    if state.resync:
        _resync(self, state, scheduler_output)
    if state.updates:
        setattr(scheduler_output, FASB_UPDATES_ATTR, state.updates)
        state.updates = []
    return scheduler_output


def _free_request(original, self, request, *args, **kwargs):
    state = steering_state(self)
    if state is not None and request.request_id in state.fasb.requests:
        state.fasb.requests[request.request_id].freed = True
    if state is not None:
        state.resync.discard(request.request_id)
        state.after_backtrack.discard(request.request_id)
    return original(self, request, *args, **kwargs)


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    patch(Scheduler, "add_request")(_add_request)
    patch(Scheduler, "_update_request_with_output")(_update_request_with_output)
    patch(Scheduler, "update_from_output")(_update_from_output)
    patch(Scheduler, "schedule")(_schedule)
    patch(Scheduler, "_free_request")(_free_request)
