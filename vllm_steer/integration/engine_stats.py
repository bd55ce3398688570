"""Steering counters of a running engine, gathered in its EngineCore process, and the start-up check
that every worker of a steering engine really steers.

``ENGINE_STATS_UTILITY`` is an EngineCore method that front-ends call as a vLLM utility
(``await engine_client.engine_core.call_utility_async(ENGINE_STATS_UTILITY)`` in the API server,
``llm.llm_engine.engine_core.call_utility(...)`` offline). It joins the scheduler's counters with
rank 0's worker counters, and ``workers_checked``: how many worker ranks the start-up check
(``check_workers_steer``) confirmed in this engine. The result is an empty dict for an engine
without steering.

The check runs right after ``EngineCore._initialize_kv_caches``, not after ``EngineCore.__init__``:
in an EngineCore process that vLLM spawns (the default, offline and served), the plugin is loaded
inside ``EngineCore.__init__`` itself, so a wrapper of ``__init__`` installed then never runs for the
engine being built; ``_initialize_kv_caches`` is looked up on the instance later in the same
``__init__``, after the workers have loaded the model, so its wrapper runs in every process.
"""

from __future__ import annotations

from vllm_steer.config import steering_config_from
from vllm_steer.integration.patching import patch
from vllm_steer.integration.scheduler import scheduler_stats
from vllm_steer.integration.worker import STATS_RPC

ENGINE_STATS_UTILITY = "vllm_steer_engine_stats"
WORKERS_CHECKED_ATTR = "_vllm_steer_workers_checked"


def engine_stats(engine_core) -> dict:
    stats = scheduler_stats(engine_core.scheduler)
    if not stats:
        return {}
    ranks = engine_core.model_executor.collective_rpc(STATS_RPC)
    rank0 = ranks[0] if ranks else {}
    for key in ("slots_in_use", "slots_total", "l2s_predictions"):
        stats[key] = rank0.get(key, 0)
    stats["workers_checked"] = getattr(engine_core, WORKERS_CHECKED_ATTR, 0)
    return stats


def check_workers_steer(engine_core) -> None:
    """Fail the engine's start-up unless every worker rank attached the steering hooks the front-end
    planned (a runner the plugin does not hook, e.g. Model Runner V2 forced by a config, would
    otherwise serve every request unsteered)."""
    config = steering_config_from(engine_core.vllm_config.additional_config)
    if config is None:
        return
    ranks = engine_core.model_executor.collective_rpc(STATS_RPC)
    for rank, stats in enumerate(ranks):
        if not stats:
            raise RuntimeError(
                f"vllm-steer: worker rank {rank} runs a model runner without the steering hooks (the plugin "
                "hooks vLLM's V1 GPUModelRunner and its CPU subclass; Model Runner V2 is not supported): "
                "refusing to serve requests unsteered"
            )
        if config.hooked_layers is not None and stats.get("hooked_layers") != config.hooked_layers:
            raise RuntimeError(
                f"vllm-steer: worker rank {rank} hooked layers {stats.get('hooked_layers')}, "
                f"the packs need {config.hooked_layers}"
            )
    setattr(engine_core, WORKERS_CHECKED_ATTR, len(ranks))


def _after_kv_caches(original, self, *args, **kwargs):
    kv_cache_config = original(self, *args, **kwargs)
    check_workers_steer(self)
    return kv_cache_config


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    setattr(EngineCore, ENGINE_STATS_UTILITY, engine_stats)
    patch(EngineCore, "_initialize_kv_caches")(_after_kv_caches)
