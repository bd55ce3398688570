"""Packs added and removed while an engine serves (``vllm serve --steering-admin-key``).

An engine started with ``steering.live_packs`` hooks every layer (the head op with probes, and the
residual op), so a new ITI, residual or probe pack needs no new hook and no recompile: its rows go
into the same persistent tables. The API server checks an upload as start-up loading does, then:

* ``ADD_PACK_UTILITY`` (an EngineCore method, called as a vLLM utility on every engine) checks it
  again and sends its bytes to every worker (``ADD_PACK_RPC``), whose registry adds it;
* ``REMOVE_PACK_UTILITY`` removes a pack from the workers at once when no request in the engine
  (waiting or running) names it; otherwise the pack *retires*: the scheduler removes it after the
  step in which the last such request left (``retire_unused``). A request holds its packs' objects
  while it runs, and the API server refuses new requests for the pack from the DELETE on, so a
  pack is never freed under a request that uses it.
"""

from __future__ import annotations

from typing import Any

from vllm_steer.errors import ConfigError, SpecError, SteeringError
from vllm_steer.integration.scheduler import steering_state
from vllm_steer.spec import parse_spec

ADD_PACK_UTILITY = "vllm_steer_add_pack"
REMOVE_PACK_UTILITY = "vllm_steer_remove_pack"
ADD_PACK_RPC = "vllm_steer_add_pack_on_worker"
REMOVE_PACK_RPC = "vllm_steer_remove_pack_on_worker"


# -- workers -----------------------------------------------------------------------------------------
def add_pack_on_worker(worker, data: bytes) -> str:
    from vllm_steer.integration.worker import PLANNER_ATTR
    from vllm_steer.pack import load_pack_bytes

    planner = getattr(worker.model_runner, PLANNER_ATTR, None)
    if planner is None:
        raise RuntimeError("this worker runs without steering")
    pack = load_pack_bytes(data, planner.registry.model)
    planner.registry.add_live(pack)
    return pack.name


def remove_pack_on_worker(worker, name: str) -> str:
    from vllm_steer.integration.worker import PLANNER_ATTR

    planner = getattr(worker.model_runner, PLANNER_ATTR, None)
    if planner is None:
        raise RuntimeError("this worker runs without steering")
    planner.registry.remove(name)
    planner.table.forget_pack(name)
    if planner.probes is not None:
        planner.probes.forget_pack(name)
    return name


# -- engine core -------------------------------------------------------------------------------------
def _live_state(engine_core):
    from vllm_steer.config import steering_config_from

    config = steering_config_from(engine_core.vllm_config.additional_config)
    state = steering_state(engine_core.scheduler)
    if config is None or state is None or not config.live_packs:
        raise ConfigError("this engine was not started with live packs (steering.live_packs)",
                          field="steering.live_packs")
    return state


def add_pack(engine_core, data: bytes) -> dict[str, Any]:
    """EngineCore utility: add the pack in ``data`` on every worker of this engine."""
    from vllm_steer.pack import load_pack_bytes

    state = _live_state(engine_core)
    name = load_pack_bytes(data).name
    if name in state.retiring:
        raise SpecError(f"pack {name!r} is still in use by running requests since its removal; add it again "
                        "once they finish", field="name")
    names = engine_core.model_executor.collective_rpc(ADD_PACK_RPC, args=(data,))
    return {"name": name, "workers": len(names)}


def requests_naming(scheduler, name: str) -> int:
    """How many requests in ``scheduler`` (waiting or running) steer with pack ``name``."""
    count = 0
    for request in scheduler.requests.values():
        params = getattr(request, "sampling_params", None)
        try:
            spec = parse_spec(params.extra_args) if params is not None else None
        except SteeringError:
            continue
        if spec is not None and any(m.pack == name for m in spec.members):
            count += 1
    return count


def remove_pack(engine_core, name: str) -> dict[str, Any]:
    """EngineCore utility: remove pack ``name`` from every worker now, or once no request uses it."""
    state = _live_state(engine_core)
    executor = engine_core.model_executor
    in_use = requests_naming(engine_core.scheduler, name)
    if in_use:
        state.retiring[name] = lambda: executor.collective_rpc(REMOVE_PACK_RPC, args=(name,))
    else:
        executor.collective_rpc(REMOVE_PACK_RPC, args=(name,))
    return {"name": name, "in_use": in_use}


def retire_unused(scheduler, state) -> None:
    """After a step: remove every retiring pack that no request names any more."""
    for name in [n for n in state.retiring if not requests_naming(scheduler, n)]:
        state.retiring.pop(name)()


def add_pack_to_llm(llm, data: bytes) -> str:
    """Offline: add the pack in ``data`` to a ``vllm.LLM`` started with ``steering.live_packs`` (its
    engine, then its front-end's registry, as the server's POST does); returns the pack's name."""
    from vllm_steer.integration.frontend import engine_steering
    from vllm_steer.pack import load_pack_bytes

    found = engine_steering(llm.llm_engine.model_config)
    if found is None:
        raise ConfigError("this LLM runs without steering", field="steering")
    registry = found[0]
    pack = load_pack_bytes(data, registry.model)
    registry.check_live(pack)
    llm.llm_engine.engine_core.call_utility(ADD_PACK_UTILITY, data)
    registry.add_live(pack)
    return pack.name


def install() -> None:
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(EngineCore, ADD_PACK_UTILITY, add_pack)
    setattr(EngineCore, REMOVE_PACK_UTILITY, remove_pack)
    setattr(WorkerBase, ADD_PACK_RPC, add_pack_on_worker)
    setattr(WorkerBase, REMOVE_PACK_RPC, remove_pack_on_worker)
