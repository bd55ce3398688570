"""Steering counters of a running engine, gathered in its EngineCore process.

``ENGINE_STATS_UTILITY`` is an EngineCore method that front-ends call as a vLLM utility
(``await engine_client.engine_core.call_utility_async(ENGINE_STATS_UTILITY)`` in the API server,
``llm.llm_engine.engine_core.call_utility(...)`` offline). It joins the scheduler's counters with
rank 0's worker counters. The result is an empty dict for an engine without steering.
"""

from __future__ import annotations

from vllm_steer.integration.scheduler import scheduler_stats
from vllm_steer.integration.worker import STATS_RPC

ENGINE_STATS_UTILITY = "vllm_steer_engine_stats"


def engine_stats(engine_core) -> dict:
    stats = scheduler_stats(engine_core.scheduler)
    if not stats:
        return {}
    ranks = engine_core.model_executor.collective_rpc(STATS_RPC)
    rank0 = ranks[0] if ranks else {}
    for key in ("slots_in_use", "slots_total", "l2s_predictions"):
        stats[key] = rank0.get(key, 0)
    return stats


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    setattr(EngineCore, ENGINE_STATS_UTILITY, engine_stats)
