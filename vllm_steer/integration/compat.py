"""What the installed vLLM offers the plugin: decided here, in one place, by feature detection (the
symbols themselves), never by comparing version numbers.

* ``REQUIRED``: every vLLM symbol the integration layer imports, wraps or calls, with the leading
  parameters it relies on. ``problems()`` lists those missing or changed in the installed vLLM;
  a steering engine refuses to start when there is any (``frontend.py``), naming them and the tested
  versions, while engines without steering run untouched.
* ``install_failures``: the patches that raised while the plugin was being installed (``record``);
  they refuse steering engines the same way. Installing the plugin never raises into vLLM.
* The version differences themselves, each behind one function: ``preempt_dropping_in_flight``
  (how a backtrack preempts a request), ``discard_in_flight`` (how an in-place backtrack drops the
  step in flight), ``block_is_writable`` (whether a KV block may be written in place),
  ``endpoint_attach_points`` (where the API server attaches endpoint plugins), ``call_utility_all`` (one
  utility call answered by every data-parallel engine) and ``ray_data_parallel_problem`` (whether
  this platform can place Ray data-parallel engines).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass

TESTED_VLLM_VERSIONS = ("0.26.0", "0.32.0")  # run in CI (CPU builds)
SUPPORTED_VLLM_RANGE = ">=0.26,<0.34"  # 0.33: symbols and signatures checked, not run


@dataclass(frozen=True)
class Needed:
    """A vLLM attribute the plugin needs: ``module`` then the dotted ``path`` inside it; for a
    callable, the names its leading parameters must have (``self`` included for methods)."""

    module: str
    path: str
    params: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"

    def problem(self) -> str | None:
        try:
            obj = importlib.import_module(self.module)
        except Exception as exc:  # noqa: BLE001 - any import failure means "missing"
            return f"{self.name}: module not importable ({type(exc).__name__}: {exc})"
        for part in self.path.split("."):
            if not hasattr(obj, part):
                if part in (getattr(obj, "__dataclass_fields__", None) or {}):  # a field without default
                    return None
                return f"{self.name}: missing"
            obj = getattr(obj, part)
        if self.params is None:
            return None
        try:
            found = tuple(inspect.signature(obj).parameters)  # follows functools.wraps
        except (TypeError, ValueError):
            return f"{self.name}: signature not readable"
        if found[: len(self.params)] != self.params:
            return f"{self.name}: expected parameters ({', '.join(self.params)}, ...), found ({', '.join(found)})"
        return None


_SCHED = "vllm.v1.core.sched.scheduler"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
REQUIRED: tuple[Needed, ...] = (
    # front-end (frontend.py, serve_flags.py)
    Needed("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self",)),
    Needed("vllm.engine.arg_utils", "EngineArgs.add_cli_args", ("parser",)),
    Needed("vllm.engine.arg_utils", "EngineArgs.from_cli_args", ("args",)),
    Needed("vllm.sampling_params", "SamplingParams._verify_args", ("self",)),
    Needed("vllm.sampling_params", "SamplingParams.verify", ("self", "model_config")),
    Needed("vllm.exceptions", "VLLMValidationError"),
    # OpenAI server (openai_server.py)
    Needed("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_sampling_params", ("self",)),
    Needed("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_sampling_params",
           ("self",)),
    # prefix cache (prefix_cache.py)
    Needed("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys",
           ("request", "start_token_idx", "end_token_idx")),
    # a CAST request never reads the prefix cache (scheduler.py sets request.skip_reading_prefix_cache)
    Needed("vllm.v1.request", "Request.get_skip_reading_prefix_cache", ("self",)),
    # scheduler (scheduler.py)
    Needed(_SCHED, "Scheduler.add_request", ("self", "request")),
    Needed(_SCHED, "Scheduler._update_request_with_output", ("self", "request", "new_token_ids")),
    Needed(_SCHED, "Scheduler.update_from_output", ("self", "scheduler_output", "model_runner_output")),
    Needed(_SCHED, "Scheduler.schedule", ("self",)),
    Needed(_SCHED, "Scheduler._free_request", ("self", "request")),
    Needed(_SCHED, "Scheduler._preempt_request", ("self", "request", "timestamp")),
    Needed(_SCHED, "Scheduler.finish_requests", ("self", "request_ids", "finished_status")),
    Needed("vllm.v1.request", "Request.update_block_hashes", ("self",)),
    Needed("vllm.v1.request", "RequestStatus.FINISHED_ERROR"),
    Needed("vllm.v1.request", "RequestStatus.PREEMPTED"),
    Needed("vllm.v1.engine", "FinishReason.ERROR"),
    Needed("vllm.v1.engine", "EngineCoreOutput"),
    Needed("vllm.v1.engine", "EngineCoreOutputs"),
    Needed("vllm.v1.engine.core", "EngineCore"),
    Needed("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", ("self", "vllm_config")),
    # in-place FASB backtracks (kv_rollback.py, scheduler.py)
    Needed("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager._apply_cow",
           ("self", "request_id", "block_idx", "source_block", "cow_block")),
    Needed("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.records_new_block_ids"),
    Needed("vllm.v1.core.kv_cache_manager", "KVCacheManager.take_kv_cache_block_copies", ("self",)),
    Needed("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_block_ids", ("self", "request_id")),
    Needed("vllm.v1.core.block_pool", "BlockPool.free_blocks", ("self", "ordered_blocks")),
    Needed("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", ("self", "num_blocks")),
    Needed("vllm.v1.core.block_pool", "BlockPool.evict_blocks", ("self", "block_ids")),
    Needed("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", ("self",)),
    Needed("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids"),
    Needed("vllm.v1.core.sched.output", "SchedulerOutput.kv_cache_block_copies"),
    # model runner (worker.py, model_shape.py)
    Needed(_RUNNER, "GPUModelRunner.load_model", ("self",)),
    Needed(_RUNNER, "GPUModelRunner._prepare_inputs", ("self", "scheduler_output")),
    Needed(_RUNNER, "GPUModelRunner._update_states", ("self", "scheduler_output")),
    Needed(_RUNNER, "GPUModelRunner.sample_tokens", ("self",)),
    # pipeline parallelism (worker.py, pipeline_stages.py)
    Needed(_RUNNER, "GPUModelRunner.execute_model", ("self", "scheduler_output", "intermediate_tensors")),
    Needed("vllm.v1.core.sched.output", "CachedRequestData.num_output_tokens"),
    Needed("vllm.distributed", "get_pp_group"),
    Needed("vllm.distributed.utils", "get_pp_indices", ("num_hidden_layers", "pp_rank", "pp_size")),
    Needed("vllm.v1.worker.worker_base", "WorkerBase"),
    Needed("vllm.distributed", "tensor_model_parallel_all_reduce"),
    Needed("vllm.distributed", "get_tensor_model_parallel_rank"),
    Needed("vllm.distributed", "get_tensor_model_parallel_world_size"),
)

install_failures: list[str] = []  # "what: error" for each patch that raised at install


def record(what: str, exc: BaseException) -> None:
    install_failures.append(f"{what}: {type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=1)
def _symbol_problems() -> tuple[str, ...]:
    return tuple(p for p in (n.problem() for n in REQUIRED) if p is not None)


def problems() -> list[str]:
    """Why this vLLM cannot run a steering engine (empty when it can)."""
    return [*_symbol_problems(), *install_failures]


def unsupported_message(found: list[str]) -> str:
    try:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        version = "not importable"
    return (f"vllm-steer cannot steer on this vLLM ({version}; supported {SUPPORTED_VLLM_RANGE}, tested "
            f"{', '.join(TESTED_VLLM_VERSIONS)}): " + "; ".join(found))


# -- the version differences --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _has_parameter(func, name: str) -> bool:
    return name in inspect.signature(func).parameters


def preempt_dropping_in_flight(scheduler, request, timestamp: float) -> None:
    """Preempt ``request`` (already out of ``scheduler.running``) and drop the output of any step of
    it still in flight (async scheduling), so it is not appended after the backtrack.

    vLLM 0.32+: ``_preempt_request(..., drop_stale_output=True)``. vLLM 0.26: no such argument; its
    async scheduler discards ``async_tokens_to_discard`` frames, as its own ``reset_prefix_cache``
    sets them after a forced preemption."""
    preempt = type(scheduler)._preempt_request
    if _has_parameter(preempt, "drop_stale_output"):
        scheduler._preempt_request(request, timestamp, drop_stale_output=True)
        return
    scheduler._preempt_request(request, timestamp)
    if hasattr(request, "async_tokens_to_discard"):
        request.async_tokens_to_discard = request.num_output_placeholders
        request.num_output_placeholders = 0


def discard_in_flight(request) -> None:
    """Drop the output of any step of running ``request`` still in flight (async scheduling) without
    preempting it: a backtrack rolled it back in place, so that output belongs to the dropped tokens.

    vLLM 0.32+: mark the in-flight tokens as stale output to drop (``num_stale_output_tokens``,
    ``drop_stale_output``; ``update_from_output`` drains them), as its own ``_handle_stopped_request``
    does. vLLM 0.26: ``async_tokens_to_discard`` frames, one per step in flight (one placeholder each:
    steering engines refuse speculative decoding)."""
    if hasattr(request, "drop_stale_output"):
        in_flight = getattr(request, "num_in_flight_tokens", 0)
        if in_flight > 0:
            request.num_stale_output_tokens = in_flight
            request.drop_stale_output = True
    elif hasattr(request, "async_tokens_to_discard"):
        request.async_tokens_to_discard += request.num_output_placeholders
    request.num_output_placeholders = 0


def block_is_writable(pool, block) -> bool:
    """Whether ``block`` may be written in place: vLLM 0.32+ asks its ``BlockPool.is_block_writable``;
    0.26 has none, and the same rule is spelled out (a real block, held by one request, not cached)."""
    check = getattr(pool, "is_block_writable", None)
    if check is not None:
        return check(block)
    return not block.is_null and block.ref_cnt == 1 and block.block_hash is None


def endpoint_attach_points() -> list[tuple[object, str]]:
    """(module, function name) pairs through which the API server attaches endpoint plugins: vLLM
    0.32+ ``plugins.endpoint_plugins.interface.attach_endpoint_plugins`` (also imported by name into
    ``entrypoints.launchers.app``); vLLM 0.26 ``entrypoints.openai.api_server._attach_endpoint_plugins``
    (which is ``__main__`` under ``python -m``). Only modules already imported are patched, besides
    the interface module."""
    points = []
    try:
        from vllm.plugins.endpoint_plugins import interface
    except ImportError:
        interface = None
    if interface is not None and hasattr(interface, "attach_endpoint_plugins"):
        points.append((interface, "attach_endpoint_plugins"))
    app_module = sys.modules.get("vllm.entrypoints.launchers.app")
    if app_module is not None and hasattr(app_module, "attach_endpoint_plugins"):
        points.append((app_module, "attach_endpoint_plugins"))
    main = sys.modules.get("__main__")
    is_api_server_main = getattr(getattr(main, "__spec__", None), "name", None) == "vllm.entrypoints.openai.api_server"
    for module in (sys.modules.get("vllm.entrypoints.openai.api_server"), main if is_api_server_main else None):
        if module is not None and hasattr(module, "_attach_endpoint_plugins"):
            points.append((module, "_attach_endpoint_plugins"))
    return points


async def call_utility_all(core, method: str, *args) -> list:
    """Call an EngineCore utility on every engine ``core`` (an API server's engine-core client)
    talks to, one answer per engine. Under data parallelism vLLM's ``call_utility_async`` asks every
    engine but returns the first one's answer only. vLLM 0.32+: ``call_utility_all_async``; 0.26: one
    ``_call_utility_async(..., engine=...)`` per ``core_engines`` entry; a client with one engine:
    ``call_utility_async``."""
    import asyncio

    if hasattr(core, "call_utility_all_async"):
        return list(await core.call_utility_all_async(method, *args))
    engines = getattr(core, "core_engines", None)
    if engines and hasattr(core, "_call_utility_async"):
        return list(await asyncio.gather(*(core._call_utility_async(method, *args, engine=engine)
                                           for engine in engines)))
    return [await core.call_utility_async(method, *args)]


def ray_data_parallel_problem(backend: str | None) -> str | None:
    """Why this vLLM build cannot run ``data_parallel_backend="ray"`` (None when it can, or when
    another backend is asked for). vLLM places Ray data-parallel engines by the platform's Ray device
    resource (``Platform.ray_device_key``, e.g. "GPU"); a platform without one (the CPU build) fails
    inside vLLM's placement-group code with an assertion, after start-up has begun."""
    if backend != "ray":
        return None
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # noqa: BLE001
        return f"vLLM's platform is not importable ({type(exc).__name__}: {exc})"
    if getattr(current_platform, "ray_device_key", ""):
        return None
    name = getattr(current_platform, "device_name", None) or type(current_platform).__name__
    return (f"this vLLM build's platform ({name}) has no Ray device resource (Platform.ray_device_key is "
            "empty), so vLLM cannot place data-parallel engines on Ray (its placement-group code asserts "
            "on it); use --data-parallel-backend mp, and for several nodes start one "
            "`vllm serve --data-parallel-size-local ...` per node (--data-parallel-address, "
            "--data-parallel-rpc-port, --headless on the other nodes)")
